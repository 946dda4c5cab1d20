// Token colours: one documented function per "colour by" choice, value -> [r, g, b] or null (no colour).
//
// Every continuous scale is mix(END, t) = round(255 + (END - 255) * t) per channel, a blend from white
// (t = 0) to END (t = 1), with t clamped to [0, 1] and round(x) = floor(x + 0.5). Diverging scales pick
// END by the value's sign. tests/cwm_rl/viewer/test_browser.py recomputes these from the stored numbers
// and compares them with the page's computed colours; docs/viewer.md states the same table.
//
//   logprob, trainer_logprob  t = -value / 5                         END red     (0 white; <= -5 full red)
//   mismatch (trainer - beh.) t = |value| / 0.5                      END red if > 0, blue if < 0
//   is_weight                 t = |log2(value)| / 2                  END orange if > 1, blue if < 1 (4x or 1/4x full)
//   advantage                 t = |value| / 2                        END green if > 0, red if < 0
//   loss_mask                 1 -> GREEN_SOFT, 0 -> GREY
//   version                   PALETTE[value mod 8]; -1 (not generated) -> null
// Tokens without the number (prompt and env tokens; no training record) get null: no background.

export const RED = [229, 57, 53];
export const BLUE = [30, 136, 229];
export const GREEN = [67, 160, 71];
export const ORANGE = [251, 140, 0];
export const GREEN_SOFT = [200, 230, 201];
export const GREY = [224, 224, 224];
export const PALETTE = [[144, 202, 249], [255, 204, 128], [165, 214, 167], [239, 154, 154],
  [206, 147, 216], [128, 222, 234], [255, 245, 157], [188, 170, 164]];

const clamp01 = (x) => Math.min(1, Math.max(0, x));
export const mix = (end, t) => end.map((c) => Math.floor(255 + (c - 255) * clamp01(t) + 0.5));
const missing = (v) => v === null || v === undefined || Number.isNaN(v);

export const MODES = {
  logprob: {label: "behaviour logprob", key: "lp", color: (v) => (missing(v) ? null : mix(RED, -v / 5)),
    legend: [["0", mix(RED, 0)], ["-2.5", mix(RED, 0.5)], ["≤ -5", mix(RED, 1)]]},
  trainer_logprob: {label: "trainer logprob", key: "tlp", color: (v) => (missing(v) ? null : mix(RED, -v / 5)),
    legend: [["0", mix(RED, 0)], ["-2.5", mix(RED, 0.5)], ["≤ -5", mix(RED, 1)]]},
  mismatch: {label: "mismatch (trainer − behaviour)", key: "mm",
    color: (v) => (missing(v) ? null : mix(v >= 0 ? RED : BLUE, Math.abs(v) / 0.5)),
    legend: [["≤ -0.5", mix(BLUE, 1)], ["0", mix(RED, 0)], ["≥ +0.5", mix(RED, 1)]]},
  version: {label: "policy version", key: "v", color: (v) => (missing(v) || v < 0 ? null : PALETTE[v % PALETTE.length]),
    legend: null},
  is_weight: {label: "IS weight", key: "w",
    color: (v) => (missing(v) ? null : mix(v >= 1 ? ORANGE : BLUE, Math.abs(Math.log2(Math.max(v, 1e-9))) / 2)),
    legend: [["≤ 0.25", mix(BLUE, 1)], ["1", mix(ORANGE, 0)], ["≥ 4", mix(ORANGE, 1)]]},
  advantage: {label: "advantage", key: "adv",
    color: (v) => (missing(v) ? null : mix(v >= 0 ? GREEN : RED, Math.abs(v) / 2)),
    legend: [["≤ -2", mix(RED, 1)], ["0", mix(GREEN, 0)], ["≥ +2", mix(GREEN, 1)]]},
  loss_mask: {label: "loss mask", key: "m", color: (v) => (missing(v) ? null : v ? GREEN_SOFT : GREY),
    legend: [["1 trained on", GREEN_SOFT], ["0 prompt / env", GREY]]},
};

export const css = (rgb) => (rgb ? `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})` : "");
