// Quality report on Save Quantized / Verify Quantized: a per-layer SQNR chart (layers in model order; bars: weights
// only, red under their format's level; a line: as ComfyUI computes the layer on a GPU class, with its activations
// quantized, where that differs) and the summary (size before/after, format mix, verify result). Reads only the
// node's `ui` output (`quant_report`), so API workflows never depend on this file.
import { app } from "../../../scripts/app.js";

const REPORT_NODES = ["QuantCoreSaveQuantized", "QuantCoreVerifyQuantized"];
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 420, HEIGHT = 170, PAD = 28, BOTTOM = 14;
const CAP_DB = 120;  // exact layers are reported as 999 dB: drawn at the top, never stretching the axis
const COLORS = { ok: "#46a758", bad: "#e5484d", level: "#f5a623", computed: "#3e9bff" };

function gib(bytes) {
  return bytes >= 1 << 30 ? `${(bytes / (1 << 30)).toFixed(2)} GiB` : `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

function svgEl(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function levelOf(report, l) {
  return l.threshold_db ?? report.threshold_db ?? 30;
}

function computedOf(l) {
  return typeof l.runtime_sqnr_db === "number" ? l.runtime_sqnr_db : null;
}

// The y-axis: the data's range (both series and the levels drawn), padded and rounded to 5 dB, at least 10 dB tall.
function axisRange(values) {
  const finite = values.filter((v) => Number.isFinite(v)).map((v) => Math.max(-CAP_DB, Math.min(v, CAP_DB)));
  let lo = Math.floor((Math.min(...finite) - 2) / 5) * 5, hi = Math.ceil((Math.max(...finite) + 2) / 5) * 5;
  if (hi - lo < 10) hi = lo + 10;
  return [lo, hi];
}

function chart(report) {
  const layers = report.layers.filter((l) => typeof l.sqnr_db === "number");
  const computed = layers.filter((l) => computedOf(l) !== null);
  const svg = svgEl("svg", { width: WIDTH, height: HEIGHT, class: "quant-core-chart", "data-layers": layers.length,
                             "data-computed": computed.length });
  if (!layers.length) return svg;
  const [lo, hi] = axisRange([...layers.map((l) => l.sqnr_db), ...layers.map((l) => levelOf(report, l)),
                              ...computed.map(computedOf)]);
  svg.dataset.lo = lo;
  svg.dataset.hi = hi;
  const base = HEIGHT - BOTTOM;
  const y = (db) => base - ((Math.max(lo, Math.min(db, hi)) - lo) / (hi - lo)) * (base - 8);
  const step = (WIDTH - PAD) / layers.length;
  const levels = [];
  layers.forEach((l, i) => {
    const level = levelOf(report, l), bad = l.sqnr_db < level;
    const bar = svgEl("rect", {
      x: PAD + i * step, y: y(l.sqnr_db), width: Math.max(step - 0.5, 0.5), height: base - y(l.sqnr_db),
      class: bad ? "quant-core-bar quant-core-bad" : "quant-core-bar", fill: bad ? COLORS.bad : COLORS.ok,
      "data-layer": l.name, "data-sqnr": l.sqnr_db, "data-threshold": level,
    });
    const tip = svgEl("title", {});
    const asComputed = computedOf(l) !== null ? `; as computed on ${l.runtime_gpu}: ${computedOf(l).toFixed(1)} dB` : "";
    tip.textContent = `${l.name}: ${l.sqnr_db.toFixed(1)} dB weights only (${l.format}; level ${level} dB)${asComputed}`;
    bar.appendChild(tip);
    svg.appendChild(bar);
    levels.push(`M${PAD + i * step} ${y(level)} H${PAD + (i + 1) * step}`);  // each layer's own format's level
  });
  svg.appendChild(svgEl("path", { d: levels.join(" "), stroke: COLORS.level, "stroke-dasharray": "4 3", fill: "none",
                                  class: "quant-core-level" }));
  if (computed.length) {
    const points = layers.map((l, i) => [l, PAD + (i + 0.5) * step]).filter(([l]) => computedOf(l) !== null);
    svg.appendChild(svgEl("polyline", { points: points.map(([l, x]) => `${x},${y(computedOf(l))}`).join(" "),
                                        stroke: COLORS.computed, fill: "none", "stroke-width": 1.2 }));
    for (const [l, x] of points) {
      const bad = l.runtime_threshold_db != null && computedOf(l) < l.runtime_threshold_db;
      const dot = svgEl("circle", { cx: x, cy: y(computedOf(l)), r: 2, fill: bad ? COLORS.bad : COLORS.computed,
                                    class: bad ? "quant-core-computed quant-core-bad" : "quant-core-computed",
                                    "data-layer": l.name, "data-sqnr": computedOf(l) });
      const tip = svgEl("title", {});
      tip.textContent = `${l.name}: ${computedOf(l).toFixed(1)} dB as computed on ${l.runtime_gpu}` +
        (l.runtime_threshold_db != null ? ` (level ${l.runtime_threshold_db} dB)` : "");
      dot.appendChild(tip);
      svg.appendChild(dot);
    }
  }
  const ticks = [...new Set([lo, hi, ...layers.map((l) => levelOf(report, l))])];
  for (const db of ticks) {
    const label = svgEl("text", { x: 2, y: y(db) + 4, fill: "#aaa", "font-size": 10 });
    label.textContent = `${db}`;
    svg.appendChild(label);
  }
  const axis = svgEl("text", { x: PAD, y: HEIGHT - 2, fill: "#aaa", "font-size": 10 });
  axis.textContent = "SQNR dB per layer (model order)";
  svg.appendChild(axis);
  return svg;
}

function legend(report) {
  const el = document.createElement("div");
  el.className = "quant-core-legend";
  const gpus = [...new Set(report.layers.filter((l) => computedOf(l) !== null).map((l) => l.runtime_gpu))];
  el.textContent = "bars: weights only (red under the format's level, dashed)" +
    (gpus.length ? `; line: as computed on ${gpus.join(", ")} (red dots under its level)` : "");
  return el;
}

function summaryLines(report) {
  const lines = [report.file];
  if (report.size_before) {
    const ratio = (100 * report.size_after / report.size_before).toFixed(1);
    lines.push(`size ${gib(report.size_before)} → ${gib(report.size_after)} (${ratio}%)`);
  } else if (report.size_after) {
    lines.push(`size ${gib(report.size_after)}`);
  }
  if (report.seconds) {
    const where = report.peak_gpu_bytes ? `on the GPU, peak ${gib(report.peak_gpu_bytes)} allocated` : "on the CPU";
    lines.push(`${Number(report.seconds).toFixed(1)} s ${where}`);
  }
  const mix = Object.entries(report.formats || {}).map(([f, n]) => `${n} × ${f}`).join(", ");
  lines.push(`formats: ${mix || "none"}${report.kept ? `; ${report.kept} kept in high precision` : ""}`);
  if (report.summary) lines.push(report.summary);
  if (report.verify && report.verify.summary !== report.summary) lines.push(report.verify.summary);
  return lines;
}

function render(report) {
  const root = document.createElement("div");
  root.className = "quant-core-report";
  root.dataset.kind = report.kind;
  root.dataset.verifyOk = String(report.verify?.ok);
  root.style.cssText = "font: 11px sans-serif; color: var(--input-text, #ddd); overflow: auto; padding: 4px;";
  for (const line of summaryLines(report)) {
    const p = document.createElement("div");
    p.textContent = line;
    root.appendChild(p);
  }
  root.appendChild(chart(report));
  root.appendChild(legend(report));
  const worst = report.layers.filter((l) => typeof l.sqnr_db === "number")
    .sort((a, b) => a.sqnr_db - b.sqnr_db).slice(0, 5);
  if (worst.length) {
    const list = document.createElement("ol");
    list.className = "quant-core-worst";
    list.style.margin = "2px 0 0 16px";
    for (const l of worst) {
      const item = document.createElement("li");
      const asComputed = computedOf(l) !== null ? ` (as computed ${computedOf(l).toFixed(1)} dB)` : "";
      item.textContent = `${l.name}: ${l.sqnr_db.toFixed(1)} dB${asComputed}`;
      list.appendChild(item);
    }
    root.appendChild(document.createTextNode("worst layers:"));
    root.appendChild(list);
  }
  return root;
}

function showReport(node, report) {
  let widget = node.widgets?.find((w) => w.name === "quant_report");
  if (!widget) {
    const holder = document.createElement("div");
    widget = node.addDOMWidget("quant_report", "quant_report", holder, { serialize: false, getMinHeight: () => 350 });
  }
  widget.element.replaceChildren(render(report));
  node.setSize([Math.max(node.size[0], WIDTH + 30), Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "quant_core.QualityReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const report = message?.quant_report?.[0];
      if (report) showReport(this, report);
    };
  },
});
