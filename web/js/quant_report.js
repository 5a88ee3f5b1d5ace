// Quality report on Save Quantized / Verify Quantized: a per-layer SQNR chart (layers in model order, worst ones
// red and listed) and the summary (size before/after, format mix, verify result). Reads only the node's `ui`
// output (`quant_report`), so API workflows never depend on this file.
import { app } from "../../../scripts/app.js";

const REPORT_NODES = ["QuantCoreSaveQuantized", "QuantCoreVerifyQuantized"];
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 420, HEIGHT = 150, PAD = 28;

function gib(bytes) {
  return bytes >= 1 << 30 ? `${(bytes / (1 << 30)).toFixed(2)} GiB` : `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

function svgEl(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function chart(report) {
  const layers = report.layers.filter((l) => typeof l.sqnr_db === "number");
  const threshold = report.threshold_db ?? 30;
  const svg = svgEl("svg", { width: WIDTH, height: HEIGHT, class: "quant-core-chart", "data-layers": layers.length });
  if (!layers.length) return svg;
  const top = Math.max(threshold + 10, ...layers.map((l) => Math.min(l.sqnr_db, 120)));
  const y = (db) => HEIGHT - PAD + 10 - (Math.max(0, Math.min(db, top)) / top) * (HEIGHT - PAD);
  const step = (WIDTH - PAD) / layers.length;
  layers.forEach((l, i) => {
    const bar = svgEl("rect", {
      x: PAD + i * step, y: y(l.sqnr_db), width: Math.max(step - 0.5, 0.5), height: HEIGHT - PAD + 10 - y(l.sqnr_db),
      class: l.sqnr_db < threshold ? "quant-core-bar quant-core-bad" : "quant-core-bar",
      fill: l.sqnr_db < threshold ? "#e5484d" : "#46a758", "data-layer": l.name, "data-sqnr": l.sqnr_db,
    });
    const tip = svgEl("title", {});
    tip.textContent = `${l.name}: ${l.sqnr_db.toFixed(1)} dB (${l.format})`;
    bar.appendChild(tip);
    svg.appendChild(bar);
  });
  svg.appendChild(svgEl("line", { x1: PAD, x2: WIDTH, y1: y(threshold), y2: y(threshold), stroke: "#f5a623",
                                  "stroke-dasharray": "4 3" }));
  for (const db of [0, threshold, Math.round(top)]) {
    const label = svgEl("text", { x: 2, y: y(db) + 4, fill: "#aaa", "font-size": 10 });
    label.textContent = `${db}`;
    svg.appendChild(label);
  }
  const axis = svgEl("text", { x: PAD, y: HEIGHT - 2, fill: "#aaa", "font-size": 10 });
  axis.textContent = `SQNR dB per layer (model order); dashed: ${threshold} dB`;
  svg.appendChild(axis);
  return svg;
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
  const worst = report.layers.filter((l) => typeof l.sqnr_db === "number")
    .sort((a, b) => a.sqnr_db - b.sqnr_db).slice(0, 5);
  if (worst.length) {
    const list = document.createElement("ol");
    list.className = "quant-core-worst";
    list.style.margin = "2px 0 0 16px";
    for (const l of worst) {
      const item = document.createElement("li");
      item.textContent = `${l.name}: ${l.sqnr_db.toFixed(1)} dB`;
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
    widget = node.addDOMWidget("quant_report", "quant_report", holder, { serialize: false, getMinHeight: () => 330 });
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
