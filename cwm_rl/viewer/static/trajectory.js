// One trajectory: header, then prompt and turns with every token coloured by the chosen number (colors.js),
// hover for all of a token's numbers; then its replays, rescores and branch sets.
import {h, api, enc, fmt, signed, hashOf, link, versions, statusChip, returnBadge, showTip, hideTip, ago} from "./dom.js";
import {MODES, css, PALETTE} from "./colors.js";
import {replayEl, rescoreRows, branchRows} from "./results.js";

// The training record's arrays, as stored: float32 trainer logprobs, float32 IS weights, int8 clip flags.
function unpack(packed) {
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const n = Math.floor(bytes.length / 9);
  return {tlp: new Float32Array(bytes.buffer, 0, n), w: new Float32Array(bytes.buffer, 4 * n, n), clip: new Int8Array(bytes.buffer, 8 * n, n)};
}

// Per-token numbers over all of token_ids (null where a token has none): what the colours and the tooltip show.
export function tokenValues(t, training) {
  const n = t.token_ids.length;
  const v = {lp: [], tlp: [], mm: [], v: [], w: [], clip: [], adv: [], m: t.loss_mask.slice(), warning: null};
  let packed = training ? unpack(training.packed) : null;
  const generated = t.loss_mask.reduce((a, b) => a + b, 0);
  if (packed && packed.tlp.length !== generated) {
    v.warning = `the training record has ${packed.tlp.length} tokens but the trajectory generated ${generated}: not shown`;
    packed = null;
  }
  let k = 0;
  for (let i = 0; i < n; i++) {
    const gen = t.loss_mask[i] === 1;
    v.lp.push(gen ? t.logprobs[i] : null);
    v.v.push(gen ? t.policy_versions[i] : null);
    const tlp = gen && packed ? packed.tlp[k] : null;
    v.tlp.push(tlp);
    v.mm.push(tlp === null ? null : tlp - t.logprobs[i]);
    v.w.push(gen && packed ? packed.w[k] : null);
    v.clip.push(gen && packed ? packed.clip[k] : null);
    v.adv.push(gen && training ? training.advantage : null);
    if (gen) k++;
  }
  return v;
}

// [kind, turn, start, end] in token order: prompt, turn k action / observation, and "context" for gaps.
function segments(t) {
  const spans = [];
  for (const turn of t.turns) {
    spans.push(["action", turn.index, turn.action_span.start, turn.action_span.end]);
    if (turn.observation_span) spans.push(["observation", turn.index, turn.observation_span.start, turn.observation_span.end]);
  }
  const out = [];
  let at = 0, prevTurn = null;  // gaps belong to the turn before them; before the first span it is the prompt
  for (const s of spans) {
    if (s[2] > at) out.push([prevTurn === null ? "prompt" : "context", prevTurn, at, s[2]]);
    out.push(s);
    at = s[3];
    prevTurn = s[1];
  }
  if (at < t.token_ids.length) out.push([prevTurn === null ? "prompt" : "context", prevTurn, at, t.token_ids.length]);
  return out;
}

function tokenBlock(t, texts, start, end) {
  const block = h("div", {class: `tokens ${texts ? "text" : "ids"}`});
  for (let i = start; i < end; i++) {
    let label = texts ? texts[i] : String(t.token_ids[i]);
    const special = texts && /^<\|.*\|>$/.test(label);
    if (texts) label = label === "" ? "·" : label.replace(/\n/g, "↵\n").replace(/\t/g, "→\t");
    block.append(h("span", {class: special ? "tok special" : "tok", "data-i": i}, label));
  }
  return block;
}

const messageEl = (m) => h("div", {class: `msg role-${m.role}`}, h("span", {class: "role"}, m.role), h("div", {class: "content"}, m.content));

export async function trajectoryView(ctx, run, key) {
  const base = `/api/r/${enc(run)}/trajectories/${enc(key)}`;
  const [d, results] = await Promise.all([api(base), api(`${base}/analysis`).catch((e) => ({error: e.message}))]);
  const {row, trajectory: t, training, token_text: texts} = d;
  const values = tokenValues(t, training);
  let mode = MODES[ctx.params.get("color")] ? ctx.params.get("color") : "logprob";
  ctx.crumbs([[run, hashOf(["r", run])], [`trajectory ${row.trajectory_id.slice(0, 10)}`, null]]);

  const kv = (k, ...v) => h("div", {class: "kv"}, h("span", {class: "k"}, k), h("span", {class: "v"}, ...v));
  const header = h("section", {class: "card head-grid"},
    kv("id", h("span", {class: "mono"}, row.trajectory_id)),
    kv("env / task", `${row.env_id} · ${row.task_id}`),
    kv("group", row.group_id ? link(hashOf(["r", run, "g", row.group_id]), `${row.group_id.slice(0, 10)} · sample ${row.sample_index}`) : "–"),
    kv("status", statusChip(row.status, row.drop_reason), row.step !== null ? ` at step ${row.step}` : ""),
    kv("return", returnBadge(row.return), ` · ${row.finish_reason}`, row.error ? h("span", {class: "bang"}, ` error: ${row.error}`) : ""),
    kv("tokens", `${row.num_generated_tokens} generated / ${row.num_tokens} · ${versions(row.oldest_version, row.newest_version)}`),
    kv("advantage", training ? `${signed(training.advantage, 4)} (trainer, step ${training.step})` : "no training record (not trained yet, or dropped)"),
    kv("finished", `${new Date(row.created_at * 1000).toISOString().replace("T", " ").slice(0, 19)} UTC (${ago(row.created_at)})`),
    Object.keys(t.reward_details || {}).length ? kv("reward details", h("code", {}, JSON.stringify(t.reward_details))) : null);

  const body = h("div", {class: "turns"});
  const firstAssistant = t.messages.findIndex((m) => m.role === "assistant");
  const promptMessages = firstAssistant < 0 ? t.messages : t.messages.slice(0, firstAssistant);
  const segs = segments(t);
  const segBlock = (kind, turn) => segs.filter((s) => s[0] === kind && s[1] === turn);
  const ctxBlocks = (turn) => segs.filter((s) => s[0] === "context" && s[1] === turn).map((s) =>
    h("div", {class: "ctx"}, h("span", {class: "muted small"}, `other tokens [${s[2]}, ${s[3]})`), tokenBlock(t, texts, s[2], s[3])));
  const prompt = segs.find((s) => s[0] === "prompt");
  body.append(h("div", {class: "card turn prompt"}, h("h3", {}, "Prompt"), ...promptMessages.map(messageEl),
    prompt ? h("details", {}, h("summary", {}, `prompt tokens [${prompt[2]}, ${prompt[3]})`), tokenBlock(t, texts, prompt[2], prompt[3])) : null));
  for (const turn of t.turns) {
    const obs = segBlock("observation", turn.index)[0];
    const gen = t.policy_versions.slice(turn.action_span.start, turn.action_span.end);
    body.append(h("div", {class: "card turn", id: `turn-${turn.index}`},
      h("h3", {}, `Turn ${turn.index}`, h("span", {class: "muted small"},
        ` · ${turn.action_span.end - turn.action_span.start} tokens · ${versions(Math.min(...gen), Math.max(...gen))} · generate ${fmt(turn.generate_s)} s · env ${fmt(turn.env_s)} s`),
      h("span", {class: "right"}, "reward ", returnBadge(turn.reward))),
      h("div", {class: "label"}, "model wrote"), tokenBlock(t, texts, turn.action_span.start, turn.action_span.end),
      texts ? null : h("details", {}, h("summary", {}, "as text"), h("pre", {class: "action"}, turn.action)),
      h("div", {class: "label"}, turn.index === t.turns.length - 1 ? "env replied (after the last turn: not seen by the model)" : "env replied"),
      ...turn.observation.map(messageEl),
      Object.keys(turn.info || {}).length ? h("div", {class: "info"}, h("code", {}, JSON.stringify(turn.info))) : null,
      obs ? h("details", {}, h("summary", {}, `observation tokens [${obs[2]}, ${obs[3]})`), tokenBlock(t, texts, obs[2], obs[3])) : null,
      ...ctxBlocks(turn.index)));
  }
  body.append(...ctxBlocks(null));

  const legend = h("div", {class: "legend"});
  const picker = h("div", {class: "modes", role: "group", "aria-label": "colour tokens by"});
  const recolor = () => {
    const m = MODES[mode];
    const vals = values[m.key];
    for (const span of body.querySelectorAll(".tok")) {
      const value = vals[+span.dataset.i];
      span.style.backgroundColor = css(m.color(value));
      span.dataset.value = value === null ? "" : String(value);
    }
    for (const b of picker.children) b.classList.toggle("on", b.dataset.mode === mode);
    legend.replaceChildren(...legendItems(mode, values));
  };
  for (const [name, m] of Object.entries(MODES)) {
    picker.append(h("button", {type: "button", "data-mode": name, onclick: () => {
      mode = name;
      history.replaceState(null, "", hashOf(["r", run, "t", row.trajectory_id], {color: name}));
      recolor();
    }}, m.label));
  }
  body.addEventListener("mouseover", (e) => {
    const span = e.target.closest(".tok");
    if (span) showTip(e, tipLines(t, texts, values, +span.dataset.i));
  });
  body.addEventListener("mouseout", (e) => { if (e.target.closest(".tok")) hideTip(); });

  const warnings = [values.warning, texts ? null : "No tokenizer for this run: tokens show as ids (see the tokenizer note in docs/viewer.md)."]
    .filter(Boolean).map((w) => h("div", {class: "note"}, w));
  const node = h("div", {class: "page"}, header,
    h("div", {class: "toolbar sticky"}, h("span", {class: "muted"}, "colour tokens by"), picker, legend), ...warnings, body,
    analysisSection(run, results));
  recolor();
  ctx.show(node, "trajectory");
}

function legendItems(mode, values) {
  const m = MODES[mode];
  const present = values[m.key].filter((x) => x !== null);
  const stats = present.length ? ` · ${present.length} tokens, mean ${fmt(present.reduce((a, b) => a + b, 0) / present.length, 3)}`
    : " · no token has this number (not trained yet?)";
  let swatches;
  if (mode === "version") {
    const vs = [...new Set(present)].sort((a, b) => a - b);
    swatches = vs.map((v) => h("span", {class: "swatch"}, h("i", {style: {background: css(PALETTE[v % PALETTE.length])}}), `v${v}`));
  } else {
    swatches = m.legend.map(([label, rgb]) => h("span", {class: "swatch"}, h("i", {style: {background: css(rgb)}}), label));
  }
  return [...swatches, h("span", {class: "muted small"}, stats)];
}

function tipLines(t, texts, v, i) {
  const lines = [["token", `#${i} · id ${t.token_ids[i]}`]];
  if (texts) lines.push(["text", JSON.stringify(texts[i])]);
  lines.push(["loss mask", String(v.m[i])]);
  if (v.lp[i] !== null) lines.push(["behaviour logprob", `${fmt(v.lp[i], 6)} (p ${fmt(Math.exp(v.lp[i]), 4)})`]);
  if (v.tlp[i] !== null) lines.push(["trainer logprob", fmt(v.tlp[i], 6)], ["mismatch", signed(v.mm[i], 4)],
    ["IS weight", fmt(v.w[i], 5)], ["clipped", ["low", "no", "high"][v.clip[i] + 1] ?? String(v.clip[i])]);
  if (v.v[i] !== null) lines.push(["policy version", String(v.v[i])]);
  if (v.adv[i] !== null) lines.push(["advantage", signed(v.adv[i], 4)]);
  return lines;
}

function analysisSection(run, results) {
  if (results.error) return h("section", {}, h("h2", {}, "Replay, rescore, branch"), h("div", {class: "note"}, results.error));
  const {replays, rescores, branches} = results;
  if (!replays.length && !rescores.length && !branches.length) {
    return h("section", {class: "muted small"}, "Not replayed, rescored or branched yet (`cwm-rl rollouts replay|rescore|branch`).");
  }
  return h("section", {class: "analysis"}, h("h2", {}, "Replay, rescore, branch"),
    replays.length ? h("div", {}, h("h3", {}, `Replays (${replays.length})`), ...replays.map(replayEl)) : null,
    rescores.length ? h("div", {}, h("h3", {}, `Rescores (${rescores.length})`), rescoreRows(run, rescores, true)) : null,
    branches.length ? h("div", {}, h("h3", {}, `Branch sets (${branches.length})`), branchRows(run, branches)) : null);
}
