// The runs page and a run's page: curves, counts per status, and the trajectory list with its filters.
import {h, api, rows, ago, enc, hashOf, link, shortId, versions, statusChip, returnBadge} from "./dom.js";
import {chart, series, DEFAULT_METRICS} from "./curves.js";

const FILTERS = ["env", "task", "group", "status", "finish_reason", "min_return", "max_return", "step", "version", "q", "order"];
const ORDERS = [["-stored", "newest first"], ["stored", "oldest first"], ["-return", "return: high → low"],
  ["return", "return: low → high"], ["-version", "policy version: newest"]];

export async function runsView(ctx) {
  const data = await api("/api/runs");
  if (data.single) { location.replace(hashOf(["r", data.runs[0].name])); return; }
  ctx.crumbs([]);
  const list = h("div", {class: "runs"});
  const render = (d) => list.replaceChildren(...d.runs.map((r) => h("a", {class: "card run-card", href: hashOf(["r", r.name])},
    h("div", {class: "run-name"}, r.name),
    r.error ? h("div", {class: "error small"}, r.error)
      : h("div", {class: "muted"}, `${r.max_seq.toLocaleString()} trajectories · newest ${ago(r.last_stored_at)}`))));
  render(data);
  ctx.show(h("div", {class: "page"}, h("h1", {}, "Runs ", h("span", {class: "muted small"}, data.root)), list), "runs");
  ctx.onPoll(async () => render(await api("/api/runs")));
}

function query(params, extra = {}) {
  const q = new URLSearchParams();
  for (const k of [...FILTERS, "cursor"]) if (params.get(k)) q.set(k, params.get(k));
  for (const [k, v] of Object.entries(extra)) if (v !== null && v !== undefined) q.set(k, v); else q.delete(k);
  return q.toString();
}

export async function runView(ctx, run) {
  const p = ctx.params;
  const base = `/api/r/${enc(run)}`;
  const [info, stats, metrics, page] = await Promise.all([api(`${base}/info`), api(`${base}/stats`), api(`${base}/metrics`),
    api(`${base}/trajectories?${query(p, {limit: 50})}`)]);
  ctx.crumbs([[run, null]]);
  const state = {metricsRows: metrics.rows, offset: metrics.offset, top: page.rows.length ? page.rows[0][0] : 0, tick: 0};

  const counts = h("div", {class: "counts"});
  const renderCounts = (s) => counts.replaceChildren(
    h("span", {class: "count total"}, h("b", {}, s.total.toLocaleString()), " trajectories"),
    ...s.all_statuses.filter((k) => s.statuses[k]).map((k) => h("a", {class: `count status-${k}`, href: hashOf(["r", run], {status: k})},
      h("b", {}, s.statuses[k].toLocaleString()), ` ${k}`)));
  renderCounts(stats);

  const charts = h("div", {class: "charts"});
  const chosen = (p.get("m") || "").split(",").filter(Boolean);
  const renderCharts = () => {
    const all = series(state.metricsRows);
    const names = chosen.length ? chosen : DEFAULT_METRICS.filter((m) => all[m]);
    charts.replaceChildren(...(names.length ? names.map((n) => chart(n, all[n] || []))
      : [h("p", {class: "muted"}, "No metrics yet (metrics.jsonl appears after the first trainer step).")]));
    const picker = h("select", {class: "metric-pick", "aria-label": "add a curve", onchange: (e) => {
      if (e.target.value) location.hash = hashOf(["r", run], {...Object.fromEntries(p), m: [...names, e.target.value].join(",")});
    }}, h("option", {value: ""}, "+ curve…"), ...Object.keys(all).filter((n) => !names.includes(n)).map((n) => h("option", {value: n}, n)));
    if (Object.keys(all).length > names.length) charts.append(h("div", {class: "chart add"}, picker));
  };
  renderCharts();

  const header = h("section", {class: "run-head"},
    h("h1", {}, run, info.summary ? h("span", {class: "chip status-trained"}, "finished") : null),
    h("div", {class: "muted small"}, info.dir,
      info.config ? ` · ${info.config.mode || ""} · ${info.config.steps ?? "?"} steps · envs ${(info.config.envs || []).join(", ")}` : "",
      " · tokens: ", info.tokenizer.source ? `text (${info.tokenizer.source})` : "ids (no tokenizer found)"),
    counts,
    info.has_analysis ? h("p", {}, link(hashOf(["r", run, "analysis"]), "Replay, rescore and branch results →")) : null);

  const table = h("tbody", {});
  const list = rows(page);
  table.append(...list.map((r) => rowEl(run, r)));
  const searchNote = h("div", {class: "muted small search-note"});
  const countNote = h("span", {class: "muted small", id: "match-count"});
  const more = h("div", {class: "pager"});
  if (p.get("q")) {
    const continueSearch = (next, searched, found) => {
      searchNote.textContent = `Text search reads each trajectory (newest first, at most 2,000 per request): searched ${searched.toLocaleString()}, ${found} match${found === 1 ? "" : "es"}${next ? "" : " — searched everything"}.`;
      more.replaceChildren(next ? h("button", {type: "button", onclick: async () => {
        const nextPage = await api(`${base}/trajectories?${query(p, {limit: 50, cursor: next})}`);
        table.append(...rows(nextPage).map((r) => rowEl(run, r)));
        continueSearch(nextPage.next, searched + nextPage.searched, found + nextPage.rows.length);
      }}, "Continue searching older trajectories") : "");
    };
    continueSearch(page.next, page.searched, page.rows.length);
  } else {
    more.append(p.get("cursor") ? link(hashOf(["r", run], {...Object.fromEntries(p), cursor: null}), "⇤ first page") : "",
      page.next ? link(hashOf(["r", run], {...Object.fromEntries(p), cursor: page.next}), "next page →") : "");
    api(`${base}/count?${query(p, {cursor: null, q: null, order: null})}`)
      .then((c) => { countNote.textContent = `${c.count.toLocaleString()} matching`; }).catch(() => {});
  }
  const banner = h("div", {class: "banner", hidden: true});

  const node = h("div", {class: "page"}, header, h("section", {}, h("h2", {}, "Curves"), charts),
    h("section", {}, h("h2", {}, "Trajectories ", countNote), filterForm(run, p, stats), banner, searchNote,
      list.length ? null : h("p", {class: "muted empty"}, p.get("q") ? "No match in the rows searched so far." : "No trajectory matches these filters."),
      h("table", {class: "list"}, h("thead", {}, h("tr", {}, ...["id", "env", "task", "group", "return", "finish", "turns",
        "tokens gen/total", "versions", "status", "step", "stored"].map((c) => h("th", {}, c)))), table), more));
  if (!ctx.show(node, "run")) return;

  const liveList = !p.get("cursor") && !p.get("q") && (p.get("order") || "-stored") === "-stored";
  ctx.onPoll(async () => {
    state.tick += 1;
    const fresh = await api(`${base}/metrics?offset=${state.offset}`);
    if (fresh.reset) state.metricsRows = [];
    if (fresh.rows.length || fresh.reset) { state.metricsRows.push(...fresh.rows); renderCharts(); }
    state.offset = fresh.offset;
    if (liveList) {
      const added = rows(await api(`${base}/trajectories?${query(p, {limit: 50, after_seq: state.top})}`));
      if (added.length) {
        state.top = added[0].seq;
        table.prepend(...added.map((r) => rowEl(run, r, true)));
        while (table.children.length > 50) table.lastChild.remove();
        node.querySelector(".empty")?.remove();
      }
    } else {
      const head = await api(`${base}/head`);
      if (head.max_seq > state.top && !p.get("q")) {
        banner.hidden = false;
        banner.replaceChildren(`${(head.max_seq - state.top).toLocaleString()} trajectories stored since this page loaded · `,
          link(hashOf(["r", run], {...Object.fromEntries(p), cursor: null, order: null}), "show the newest"));
      }
    }
    if (state.tick % 5 === 0) renderCounts(await api(`${base}/stats`));
  });
}

function rowEl(run, r, isNew = false) {
  const href = hashOf(["r", run, "t", r.trajectory_id]);
  return h("tr", {class: isNew ? "new" : null, "data-seq": r.seq, "data-id": r.trajectory_id},
    h("td", {class: "mono"}, link(href, shortId(r.trajectory_id))),
    h("td", {}, r.env_id), h("td", {class: "task"}, r.task_id),
    h("td", {class: "mono"}, r.group_id ? link(hashOf(["r", run, "g", r.group_id]), `${shortId(r.group_id).slice(0, 6)} #${r.sample_index}`) : "–"),
    h("td", {class: "num"}, returnBadge(r.return)),
    h("td", {}, r.finish_reason, r.error ? h("span", {class: "bang", title: r.error}, " !") : null),
    h("td", {class: "num"}, r.num_turns),
    h("td", {class: "num"}, `${r.num_generated_tokens}/${r.num_tokens}`),
    h("td", {}, versions(r.oldest_version, r.newest_version)),
    h("td", {}, statusChip(r.status, r.drop_reason)),
    h("td", {class: "num"}, r.step ?? "–"),
    h("td", {class: "muted small", title: new Date(r.stored_at * 1000).toISOString()}, ago(r.stored_at)));
}

function filterForm(run, p, stats) {
  const field = (name, label, control) => h("label", {class: "field"}, h("span", {}, label), control);
  const input = (name, placeholder, type = "text") => h("input", {name, type, placeholder, value: p.get(name) || "",
    step: type === "number" ? "any" : null});
  const select = (name, options) => h("select", {name}, h("option", {value: ""}, "any"),
    ...options.map(([v, l]) => h("option", {value: v, selected: p.get(name) === v}, l)));
  const form = h("form", {class: "filters", onsubmit: (e) => {
    e.preventDefault();
    const values = Object.fromEntries(new FormData(form).entries());
    if (values.order === "-stored") delete values.order;
    location.hash = hashOf(["r", run], {...values, m: p.get("m")});
  }},
  field("env", "env", select("env", stats.envs.map((e) => [e, e]))),
  field("task", "task", input("task", "id or glob*")),
  field("status", "status", select("status", stats.all_statuses.map((s) => [s, s]))),
  field("finish_reason", "finish", select("finish_reason", stats.finish_reasons.map((s) => [s, s]))),
  field("min_return", "return ≥", input("min_return", "", "number")),
  field("max_return", "return ≤", input("max_return", "", "number")),
  field("step", "step", input("step", "", "number")),
  field("version", "version", input("version", "", "number")),
  field("q", "text", input("q", "search transcripts")),
  field("order", "order", h("select", {name: "order"}, ...ORDERS.map(([v, l]) => h("option", {value: v, selected: (p.get("order") || "-stored") === v}, l)))),
  h("input", {type: "hidden", name: "group", value: p.get("group") || ""}),
  h("div", {class: "actions"}, h("button", {type: "submit", class: "primary"}, "Apply"),
    link(hashOf(["r", run], {m: p.get("m")}), "clear")));
  for (const s of form.querySelectorAll("select")) s.addEventListener("change", () => form.requestSubmit());
  return form;
}
