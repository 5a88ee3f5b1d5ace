"""`python -m quant_core verify FILE [--reference SRC]`: check a file against ComfyUI's loading contract."""
from __future__ import annotations

import json

from .parser import OneLineParser


def run_verify(argv: list[str]) -> int:
    from ..verify import verify_file
    parser = OneLineParser(prog="convert_to_quant verify",
                                     description="Check a quantized file against ComfyUI's loading contract.")
    parser.add_argument("file")
    parser.add_argument("--reference", help="the source file: rebuild each layer through comfy-kitchen and compare")
    parser.add_argument("--allow-legacy", action="store_true",
                        help="report fork-only formats (int8_blockwise, fp8 row/block) as warnings, not defects")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = verify_file(args.file, args.reference, args.allow_legacy)
    if args.json:
        print(json.dumps({"ok": result.ok, "defects": result.defects, "warnings": result.warnings,
                          "layers": [vars(l) for l in result.layers]}, indent=2))
    else:
        for layer in result.layers:
            error = "" if layer.rel_error is None else f"  rel.error {layer.rel_error:.4g}"
            print(f"{layer.layer:<60} {layer.format}{'' if layer.upstream else ' [NOT UPSTREAM]'}{error}")
        for warning in result.warnings:
            print(f"warning: {warning}")
        for defect in result.defects:
            print(f"DEFECT: {defect}")
        print(result.summary())
    return 0 if result.ok else 1
