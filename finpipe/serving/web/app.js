// The chat page: the model picker and compare mode, the lake's tickers and example questions, and each question
// asked of the server (streamed) and shown with its verdict and facts.

import { ask, getJSON, health } from "./api.js";
import { el, turnView } from "./render.js";

const $ = (id) => document.getElementById(id);
const state = { champion: null, tickers: [], names: {}, families: [], ticker: null, asOf: null, controller: null };

function showBanner(message) {
  $("banner").hidden = !message;
  $("banner").textContent = message ?? "";
}

function setStatus() {
  const parts = [state.champion ? `champion ${state.champion}` : "no champion yet: the base model answers",
    state.asOf ? `market data as of ${state.asOf}` : null];
  $("status").textContent = parts.filter(Boolean).join(" · ");
}

async function loadModels() {
  const { data } = await getJSON("/v1/models");
  const champion = data.find((m) => m.id === "champion");
  state.champion = champion?.finpipe?.run_id ?? null;
  const options = data.filter((m) => m.id !== state.champion).map((m) => {
    const label = m.id === "champion" ? `champion (${state.champion})` : m.id === "base" ? "base" : `run ${m.id}`;
    return el("option", { value: m.id }, label);
  });
  $("model").replaceChildren(...options);
  $("compare").disabled = !state.champion;
  $("compare").parentElement.title = state.champion ? "" : "there is no champion to compare with yet";
}

function questionsFor(ticker) {
  const other = state.tickers.find((t) => t !== ticker);
  return state.families
    .filter((f) => !f.template.includes("{u}") || other)
    .map((f) => ({ family: f.family, question: f.template.replaceAll("{t}", ticker).replaceAll("{u}", other) }));
}

function renderSuggestions() {
  $("tickers").replaceChildren(...state.tickers.map((ticker) => el("button", {
    type: "button", class: "chip ticker", "aria-pressed": String(ticker === state.ticker),
    title: state.names[ticker] ?? ticker, onclick: () => { state.ticker = ticker; renderSuggestions(); },
  }, ticker)));
  const asked = state.ticker ? questionsFor(state.ticker) : [];
  $("examples").replaceChildren(...asked.map(({ family, question }) => el("button", {
    type: "button", class: "chip example", title: question,
    onclick: () => { $("question").value = question; $("question").focus(); },
  }, family)));
  $("questions").replaceChildren(...state.tickers.flatMap(questionsFor).slice(0, 60)
    .map(({ question }) => el("option", { value: question })));
}

async function loadExamples() {
  const found = await getJSON("/v1/finpipe/examples");
  state.tickers = found.tickers.map((t) => t.ticker);
  state.names = Object.fromEntries(found.tickers.map((t) => [t.ticker, t.name]));
  state.families = found.families;
  state.ticker = state.tickers[0] ?? null;
  state.asOf = found.as_of;
  renderSuggestions();
}

async function answerInto(turn, model, label, question, signal) {
  const view = turn.addAnswer(label);
  let text = "";
  try {
    const result = await ask(model, question, {
      signal,
      onText: (piece) => { text += piece; view.stream(text); },
    });
    turn.showFacts(result.finpipe.grounding);
    view.finish(text, result.finpipe, result.model);
  } catch (error) {
    view.fail(error);
  }
}

function setBusy(busy) {
  $("send").textContent = busy ? "Stop" : "Ask";
  $("send").classList.toggle("stop", busy);
}

async function submit(event) {
  event.preventDefault();
  if (state.controller) { // the button reads "Stop": end the answers in flight (the server stops generating)
    state.controller.abort();
    return;
  }
  const question = $("question").value.trim();
  if (!question) return;
  const compare = $("compare").checked && state.champion;
  const models = compare ? [["base", "base"], ["champion", `champion (${state.champion})`]]
    : [[$("model").value, $("model").selectedOptions[0]?.textContent ?? $("model").value]];
  $("intro")?.remove();
  const turn = turnView(question);
  $("conversation").append(turn.root);
  turn.root.scrollIntoView({ block: "end" });
  state.controller = new AbortController();
  setBusy(true);
  try {
    await Promise.all(models.map(([model, label]) => answerInto(turn, model, label, question,
      state.controller.signal)));
  } finally {
    state.controller = null;
    setBusy(false);
    turn.root.scrollIntoView({ block: "end" });
  }
}

async function start() {
  $("ask").addEventListener("submit", submit);
  $("compare").addEventListener("change", () => { $("model").disabled = $("compare").checked; });
  const problems = [];
  const loaded = await Promise.allSettled([loadModels(), loadExamples()]);
  for (const outcome of loaded) if (outcome.status === "rejected") problems.push(outcome.reason.message);
  try {
    const said = await health();
    if (said.degraded?.length) problems.push(`The server is degraded: ${said.degraded.join("; ")}`);
  } catch (error) {
    problems.push(`The server's health is unknown (${error.message})`);
  }
  setStatus();
  showBanner(problems.join(" · ") || null);
}

// a script error must still leave a page that says what happened
window.addEventListener("error", (event) => showBanner(`The page failed: ${event.message}`));
window.addEventListener("unhandledrejection", (event) => showBanner(`The page failed: ${event.reason}`));
start();
