// A group page: the G samples of one task, side by side, with their returns and advantages.
import {h, api, enc, fmt, signed, hashOf, link, statusChip, returnBadge} from "./dom.js";

const messageEl = (m) => h("div", {class: `msg role-${m.role}`}, h("span", {class: "role"}, m.role), h("div", {class: "content"}, m.content));

export async function groupView(ctx, run, groupId) {
  const g = await api(`/api/r/${enc(run)}/groups/${enc(groupId)}`);
  ctx.crumbs([[run, hashOf(["r", run])], [`group ${groupId.slice(0, 10)}`, null]]);
  const maxAbs = Math.max(1e-9, ...g.samples.map((s) => Math.abs(s.advantage)));
  const computed = g.samples.some((s) => s.advantage_source !== "trainer");
  const columns = g.samples.map((s) => {
    const r = s.row;
    const width = `${(Math.abs(s.advantage) / maxAbs) * 50}%`;
    return h("div", {class: "card sample", "data-id": r.trajectory_id},
      h("div", {class: "sample-head"},
        link(hashOf(["r", run, "t", r.trajectory_id]), `sample ${r.sample_index}`),
        h("span", {class: "right"}, "return ", returnBadge(r.return))),
      h("div", {class: "adv", title: `advantage ${s.advantage} (${s.advantage_source})`},
        h("span", {class: "k"}, "advantage"),
        h("span", {class: "bar"}, h("i", {class: s.advantage >= 0 ? "pos" : "neg",
          style: s.advantage >= 0 ? {left: "50%", width} : {right: "50%", width}})),
        h("span", {class: "v", "data-advantage": s.advantage}, signed(s.advantage, 3)),
        s.advantage_source === "trainer" ? null : h("span", {class: "muted small"}, " *")),
      h("div", {class: "muted small"}, statusChip(r.status, r.drop_reason), ` ${r.finish_reason} · ${r.num_turns} turn${r.num_turns === 1 ? "" : "s"} · ${r.num_generated_tokens} tokens`),
      ...s.turns.map((turn) => h("div", {class: "sample-turn"},
        h("div", {class: "label"}, `turn ${turn.index}`, h("span", {class: "right"}, "reward ", returnBadge(turn.reward))),
        h("pre", {class: "action"}, turn.action),
        ...turn.observation.map(messageEl))));
  });
  const node = h("div", {class: "page"},
    h("h1", {}, `Group of ${g.num_samples}`, h("span", {class: "muted small"}, ` ${g.env_id} · task ${g.task_id}`)),
    h("div", {class: "card"}, ...g.prompt.map(messageEl),
      h("div", {class: "muted small"}, `mean return ${fmt(g.mean_return, 4)} · std ${fmt(g.std_return, 4)} · group ${g.group_id}`)),
    computed ? h("div", {class: "note"}, "* advantage computed here as return − group mean (no training record for these samples; "
      + "the trainer may also divide by the group's std)") : null,
    h("div", {class: "samples", style: {gridTemplateColumns: `repeat(${g.samples.length}, minmax(260px, 1fr))`}}, ...columns));
  ctx.show(node, "group");
}
