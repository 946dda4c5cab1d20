// Replay, rescore and branch results (RUN_DIR/analysis.sqlite): the run's overview, one rescore set,
// one branch set side by side, and the pieces the trajectory page shows.
import {h, api, enc, fmt, ago, hashOf, link, shortId, returnBadge} from "./dom.js";

const short = (v) => { const s = typeof v === "string" ? v : JSON.stringify(v); return s === undefined ? "–" : s; };
const verdict = (ok, yes, no) => h("span", {class: `chip ${ok ? "good" : "bad"}`}, ok ? yes : no);

export function replayEl(r) {
  const changed = r.turns.filter((t) => t.diffs.length);
  return h("div", {class: "card replay", "data-identical": r.identical},
    h("div", {}, verdict(r.identical, "identical", "diverged"), ` replayed ${ago(r.created_at)} on ${r.target} · return `,
      returnBadge(r.recorded_return), " → ", r.replayed_return === null ? "–" : returnBadge(r.replayed_return)),
    r.first_divergence ? h("div", {class: "first-div"}, "first divergence: ", h("code", {}, r.first_divergence)) : null,
    changed.length ? h("table", {class: "diffs"}, h("thead", {}, h("tr", {}, ...["turn", "field", "recorded", "replayed", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...changed.flatMap((t) => t.diffs.map((d) => h("tr", {class: d.expected ? "expected" : "diverged"},
        h("td", {}, t.turn < 0 ? "reset" : String(t.turn)), h("td", {class: "mono"}, d.field),
        h("td", {}, h("code", {}, short(d.recorded))), h("td", {}, h("code", {}, short(d.replayed))),
        h("td", {class: "muted small"}, d.expected ? `may differ: ${d.expected}` : "diverged"))))))
      : h("div", {class: "muted small"}, `all ${r.turns.length} steps (reset included) matched`));
}

const rewards = (old, now) => h("span", {class: "rewards"}, ...old.map((x, i) =>
  h("span", {class: now[i] === x ? "same" : "changed"}, `${fmt(x)}→${now[i] === undefined ? "–" : fmt(now[i])}`)));

export function rescoreRows(run, results, withLabel = false) {
  return h("table", {class: "list rescores"}, h("thead", {}, h("tr", {}, ...[withLabel ? "rescore" : "trajectory", "env / task",
    "return before → after", "", "turn rewards before→after", "error"].map((c) => h("th", {}, c)))),
  h("tbody", {}, ...results.map((r) => h("tr", {class: r.flipped ? "flipped" : null, "data-id": r.trajectory_id},
    h("td", {class: "mono"}, withLabel ? link(hashOf(["r", run, "rescore", r.rescore_id]), r.label || shortId(r.rescore_id))
      : link(hashOf(["r", run, "t", r.trajectory_id]), shortId(r.trajectory_id))),
    h("td", {}, `${r.env_id} · ${r.task_id}`),
    h("td", {}, returnBadge(r.old_return), " → ", r.new_return === null ? "–" : returnBadge(r.new_return)),
    h("td", {}, r.flipped ? h("span", {class: "chip bad"}, "flipped") : ""),
    h("td", {}, rewards(r.old_rewards, r.new_rewards)), h("td", {class: "bang"}, r.error || "")))));
}

export function branchRows(run, sets) {
  return h("table", {class: "list"}, h("thead", {}, h("tr", {}, ...["branch", "from trajectory", "turn", "model", "returns (original →)"].map((c) => h("th", {}, c)))),
    h("tbody", {}, ...sets.map((b) => h("tr", {},
      h("td", {class: "mono"}, link(hashOf(["r", run, "branch", b.branch_id]), shortId(b.branch_id))),
      h("td", {class: "mono"}, link(hashOf(["r", run, "t", b.trajectory_id]), shortId(b.trajectory_id))),
      h("td", {class: "num"}, b.turn), h("td", {}, b.model, b.policy_version !== null ? ` (v${b.policy_version})` : ""),
      h("td", {}, returnBadge(b.original_return), " → ", ...b.returns.map((x) => [returnBadge(x), " "]))))));
}

export async function analysisView(ctx, run) {
  const a = await api(`/api/r/${enc(run)}/analysis`);
  ctx.crumbs([[run, hashOf(["r", run])], ["replay · rescore · branch", null]]);
  const empty = (what) => h("p", {class: "muted"}, `No ${what} yet.`);
  const node = h("div", {class: "page"}, h("h1", {}, "Replay, rescore and branch results"),
    h("section", {}, h("h2", {}, `Rescore sets (${a.rescore_sets.length})`), a.rescore_sets.length ? h("table", {class: "list"},
      h("thead", {}, h("tr", {}, ...["set", "what changed", "when", "trajectories", "changed", "flipped", "mean return before → after"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...a.rescore_sets.map((s) => h("tr", {},
        h("td", {class: "mono"}, link(hashOf(["r", run, "rescore", s.rescore_id]), shortId(s.rescore_id))), h("td", {}, s.label || "–"),
        h("td", {class: "muted small"}, ago(s.created_at)), h("td", {class: "num"}, s.num_trajectories), h("td", {class: "num"}, s.num_changed),
        h("td", {class: "num"}, s.num_flipped), h("td", {}, `${fmt(s.mean_return_before, 4)} → ${fmt(s.mean_return_after, 4)}`))))) : empty("rescore sets")),
    h("section", {}, h("h2", {}, `Branch sets (${a.branch_sets.length})`), a.branch_sets.length ? branchRows(run, a.branch_sets) : empty("branch sets")),
    h("section", {}, h("h2", {}, `Replays (${a.replays.length})`), a.replays.length ? h("table", {class: "list"},
      h("thead", {}, h("tr", {}, ...["trajectory", "env / task", "when", "result", "return recorded → replayed", "first divergence"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...a.replays.map((r) => h("tr", {},
        h("td", {class: "mono"}, link(hashOf(["r", run, "t", r.trajectory_id]), shortId(r.trajectory_id))), h("td", {}, `${r.env_id} · ${r.task_id}`),
        h("td", {class: "muted small"}, ago(r.created_at)), h("td", {}, verdict(r.identical, "identical", "diverged")),
        h("td", {}, returnBadge(r.recorded_return), " → ", r.replayed_return === null ? "–" : returnBadge(r.replayed_return)),
        h("td", {}, r.first_divergence ? h("code", {}, r.first_divergence) : ""))))) : empty("replays")));
  ctx.show(node, "analysis");
}

export async function rescoreView(ctx, run, id) {
  const flipped = ctx.params.get("flipped") === "1";
  const offset = Number(ctx.params.get("offset") || 0);
  const d = await api(`/api/r/${enc(run)}/rescores/${enc(id)}?flipped=${flipped}&offset=${offset}&limit=200`);
  const s = d.set;
  ctx.crumbs([[run, hashOf(["r", run])], ["results", hashOf(["r", run, "analysis"])], [`rescore ${shortId(s.rescore_id)}`, null]]);
  const node = h("div", {class: "page"}, h("h1", {}, "Rescore ", h("span", {class: "muted small mono"}, s.rescore_id)),
    h("div", {class: "card"}, h("div", {}, h("b", {}, s.label || "(no label)")),
      h("div", {class: "muted small"}, `${ago(s.created_at)} · imports ${s.imports.join(", ") || "–"} · env kwargs ${JSON.stringify(s.env_kwargs)} · filters ${JSON.stringify(s.filters)}`),
      h("div", {}, `${s.num_trajectories} trajectories · ${s.num_changed} changed · `, h("b", {}, `${s.num_flipped} flipped`),
        ` · ${s.num_errors} errors · mean return ${fmt(s.mean_return_before, 4)} → ${fmt(s.mean_return_after, 4)}`)),
    h("p", {}, flipped ? link(hashOf(["r", run, "rescore", id]), "show all") : link(hashOf(["r", run, "rescore", id], {flipped: 1}), "show flips only")),
    rescoreRows(run, d.results),
    d.more ? h("p", {}, link(hashOf(["r", run, "rescore", id], {flipped: flipped ? 1 : null, offset: offset + 200}), "next 200 →")) : null);
  ctx.show(node, "rescore");
}

const messageEl = (m) => h("div", {class: `msg role-${m.role}`}, h("span", {class: "role"}, m.role), h("div", {class: "content"}, m.content));

function branchColumn(title, t, fromTurn, original) {
  return h("div", {class: `card sample ${original ? "original" : ""}`},
    h("div", {class: "sample-head"}, title, h("span", {class: "right"}, "return ", returnBadge(t.return))),
    h("div", {class: "muted small"}, t.finish_reason, t.error ? ` · error: ${t.error}` : ""),
    fromTurn > 0 ? h("div", {class: "muted small"}, `${fromTurn === 1 ? "turn 0" : `turns 0–${fromTurn - 1}`}: the shared prefix (replayed exactly)`) : null,
    ...t.turns.filter((turn) => turn.index >= fromTurn).map((turn) => h("div", {class: "sample-turn"},
      h("div", {class: "label"}, `turn ${turn.index}`, h("span", {class: "right"}, "reward ", returnBadge(turn.reward))),
      h("pre", {class: "action"}, turn.action), ...turn.observation.map(messageEl))));
}

export async function branchView(ctx, run, id) {
  const d = await api(`/api/r/${enc(run)}/branches/${enc(id)}`);
  const b = d.set;
  ctx.crumbs([[run, hashOf(["r", run])], ["results", hashOf(["r", run, "analysis"])], [`branch ${shortId(b.branch_id)}`, null]]);
  const cols = [d.original ? branchColumn(link(hashOf(["r", run, "t", b.trajectory_id]), "original"), d.original, b.turn, true)
    : h("div", {class: "card sample"}, "The original trajectory is not in the rollout store.")];
  d.continuations.forEach((c) => cols.push(branchColumn(`continuation ${c.sample_index}`, c, b.turn, false)));
  const mean = b.returns.length ? b.returns.reduce((x, y) => x + y, 0) / b.returns.length : null;
  const node = h("div", {class: "page"}, h("h1", {}, "Branch ", h("span", {class: "muted small mono"}, b.branch_id)),
    h("div", {class: "card"}, h("div", {}, `From turn ${b.turn} of `, link(hashOf(["r", run, "t", b.trajectory_id]), shortId(b.trajectory_id)),
      ` (${b.env_id} · ${b.task_id}), ${b.prefix_tokens} prefix tokens, temperature ${b.temperature}`),
    h("div", {class: "muted small"}, `model ${b.model}${b.policy_version !== null ? ` (policy v${b.policy_version})` : ""} · ${ago(b.created_at)}`),
    h("div", {}, "return: original ", returnBadge(b.original_return), ` · continuations mean ${fmt(mean, 4)} (${b.returns.map((x) => fmt(x)).join(", ")})`)),
    h("div", {class: "samples", style: {gridTemplateColumns: `repeat(${cols.length}, minmax(260px, 1fr))`}}, ...cols));
  ctx.show(node, "branch");
}
