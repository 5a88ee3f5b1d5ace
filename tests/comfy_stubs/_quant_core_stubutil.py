"""Helper for the minimal torchvision/torchaudio stubs used by tests/test_comfyui_loader.py.

Some ComfyUI model modules `import torchvision` / `import torchaudio` at module level, so
`import comfy.sd` fails in a CPU-only Python that lacks those packages (or where their wheels
don't match the installed torch). The quantized-file loader never uses them. These stubs make the
imports succeed: every attribute and every `import <root>.x.y` resolves to a placeholder; calling or
instantiating a placeholder raises RuntimeError, so real use fails loudly.

The test only puts a stub on PYTHONPATH for a package that the ComfyUI Python cannot import.
"""
import importlib.machinery
import sys
import types


class _StubMeta(type):
    """Chained attribute access on a placeholder class (torchvision.ops.x.y) stays a placeholder."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(qualname):
    def _fail(*_a, **_k):
        raise RuntimeError(f"{qualname} is a stub (quant_core test stub; the real package is not installed)")

    class _Stub(metaclass=_StubMeta):  # subclassable, so `class X(torchvision.Foo)` still imports
        def __new__(cls, *a, **k):
            _fail()

    _Stub.__name__ = qualname.rsplit(".", 1)[-1]
    _Stub.__qualname__ = qualname
    return _Stub


class StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        obj = _placeholder(full)
        setattr(self, name, obj)
        return obj


class _Finder:
    """Meta-path finder: `import <root>.anything` yields a StubModule."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = StubModule(spec.name)
        mod.__path__ = []
        mod.__stub__ = True
        return mod

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        setattr(sys.modules[parent], child, module)


def install(root_module):
    root_module.__class__ = StubModule
    root_module.__stub__ = True
    sys.meta_path.append(_Finder(root_module.__name__))
