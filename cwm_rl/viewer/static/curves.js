// Curves of metrics.jsonl as inline SVG (nothing loaded from outside): one small chart per metric.
import {h, fmt, showTip, hideTip} from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const W = 360, H = 150, L = 44, R = 10, T = 12, B = 24;
export const DEFAULT_METRICS = ["reward_mean", "eval_accuracy", "loss", "tokens_per_s"];

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// Series of every numeric key but `step`: {name: [[step, value], ...]}, in file order.
export function series(rows) {
  const out = {};
  for (const row of rows) {
    for (const [k, v] of Object.entries(row)) {
      if (k === "step" || typeof v !== "number" || !Number.isFinite(v)) continue;
      (out[k] ||= []).push([row.step, v]);
    }
  }
  return out;
}

export function chart(name, points) {
  const box = h("figure", {class: "chart", "data-metric": name});
  const last = points[points.length - 1];
  box.append(h("figcaption", {}, h("span", {class: "name"}, name),
    h("span", {class: "last"}, last ? `${fmt(last[1], 4)} @ step ${last[0]}` : "no data yet")));
  if (!points.length) return box;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const plot = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": `${name} per step`});
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    plot.append(svg("line", {x1: L, x2: W - R, y1: py(y), y2: py(y), class: "grid"}),
      svg("text", {x: L - 6, y: py(y) + 4, class: "tick", "text-anchor": "end"}, fmt(y, 3)));
  }
  plot.append(svg("text", {x: L, y: H - 6, class: "tick"}, `step ${fmt(x0)}`),
    svg("text", {x: W - R, y: H - 6, class: "tick", "text-anchor": "end"}, fmt(x1)));
  plot.append(svg("polyline", {points: points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" "), class: "line"}));
  if (points.length <= 60) for (const [x, y] of points) plot.append(svg("circle", {cx: px(x), cy: py(y), r: 2.2, class: "pt"}));
  const cursor = svg("line", {x1: 0, x2: 0, y1: T, y2: H - B, class: "cursor", visibility: "hidden"});
  plot.append(cursor);
  plot.addEventListener("mousemove", (e) => {
    const rect = plot.getBoundingClientRect();
    const x = x0 + (((e.clientX - rect.left) / rect.width) * W - L) / (W - L - R) * (x1 - x0);
    let best = points[0];
    for (const p of points) if (Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
    cursor.setAttribute("x1", px(best[0]));
    cursor.setAttribute("x2", px(best[0]));
    cursor.setAttribute("visibility", "visible");
    showTip(e, [["step", String(best[0])], [name, fmt(best[1], 6)]]);
  });
  plot.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); hideTip(); });
  box.append(plot);
  return box;
}
