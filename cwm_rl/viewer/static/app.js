// The viewer page: hash routing (every view is a shareable URL), the live poll, the breadcrumb.
//
//   #/                                  runs (a single run opens directly)
//   #/r/RUN?env=&status=&min_return=... the run: curves, counts, trajectories with filters
//   #/r/RUN/t/ID?color=logprob          one trajectory, tokens coloured by `color` (colors.js)
//   #/r/RUN/g/GROUP                     a group's samples side by side
//   #/r/RUN/analysis                    replay, rescore and branch results of the run
//   #/r/RUN/rescore/ID?flipped=1        one rescore set;   #/r/RUN/branch/ID   one branch set
import {h, errorBox, hashOf, hideTip, link} from "./dom.js";
import {runsView, runView} from "./runs.js";
import {trajectoryView} from "./trajectory.js";
import {groupView} from "./group.js";
import {analysisView, rescoreView, branchView} from "./results.js";

const POLL_MS = 2000;
const state = {routeId: 0, poll: null, live: true, busy: false};

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const at = raw.indexOf("?");
  const path = at < 0 ? raw : raw.slice(0, at);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return {parts, params: new URLSearchParams(at < 0 ? "" : raw.slice(at + 1))};
}

function setCrumbs(items) {
  const nav = document.getElementById("crumbs");
  const nodes = [link("#/", "runs")];
  for (const [label, href] of items) nodes.push(h("span", {class: "sep"}, "›"), href ? link(href, label) : h("span", {}, label));
  nav.replaceChildren(...nodes);
}

function setLive(text, kind) {
  const node = document.getElementById("live");
  node.className = `live ${kind}`;
  document.getElementById("live-text").textContent = text;
}

async function route() {
  const id = ++state.routeId;
  state.poll = null;
  hideTip();  // a hovered token or chart point of the previous view is gone without a mouseout
  const main = document.getElementById("main");
  main.removeAttribute("data-ready");
  const {parts, params} = parseHash();
  const ctx = {
    params,
    stale: () => id !== state.routeId,
    crumbs: setCrumbs,
    onPoll: (fn) => { if (id === state.routeId) state.poll = fn; },
    show: (node, view) => {
      if (id !== state.routeId) return false;
      main.replaceChildren(node);
      main.dataset.view = view;
      main.dataset.ready = "1";
      return true;
    },
  };
  try {
    const [a, run, kind, key] = parts;
    if (parts.length === 0) await runsView(ctx);
    else if (a === "r" && parts.length === 2) await runView(ctx, run);
    else if (a === "r" && kind === "t" && key) await trajectoryView(ctx, run, key);
    else if (a === "r" && kind === "g" && key) await groupView(ctx, run, parts.slice(3).join("/"));
    else if (a === "r" && kind === "analysis") await analysisView(ctx, run);
    else if (a === "r" && kind === "rescore" && key) await rescoreView(ctx, run, key);
    else if (a === "r" && kind === "branch" && key) await branchView(ctx, run, key);
    else throw new Error(`no page at ${location.hash}; start from the list of runs`);
  } catch (e) {
    setCrumbs([]);
    ctx.show(h("div", {class: "page"}, errorBox(e.message), h("p", {}, link("#/", "← back to the runs"))), "error");
  }
}

async function tick() {
  if (!state.live || document.hidden || !state.poll || state.busy) return;
  state.busy = true;
  try {
    await state.poll();
    setLive(`live · ${new Date().toLocaleTimeString()}`, "ok");
  } catch (e) {
    setLive(`offline: ${e.message}`, "bad");
  } finally {
    state.busy = false;
  }
}

document.getElementById("live").addEventListener("click", () => {
  state.live = !state.live;
  setLive(state.live ? "live" : "paused (click to resume)", state.live ? "ok" : "paused");
});
window.addEventListener("hashchange", route);
setInterval(tick, POLL_MS);
route();
