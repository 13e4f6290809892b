// The page's pieces, built as DOM nodes (model text is never parsed as HTML): a question's turn, the facts it was
// grounded in, and one model's answer with its verdict and each number marked.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  return node;
}

const VERDICTS = {
  verified: "every number was checked against the market data",
  unverified: "the answer does not match the market data",
  ungrounded: "no market data for this question: nothing could be checked",
  refused: "the lake's market data cannot answer this, so no model was asked",
};
const STATUS_WORDS = { checked: "checked", wrong: "wrong", unchecked: "not checkable" };

function describe(number) {
  if (number.status === "checked") return `checked: ${number.fact ?? "a fact of the market data"}`;
  if (number.status === "wrong") {
    return `wrong: ${number.problem ?? "not the market data's"}${number.fact ? ` (fact: ${number.fact})` : ""}`;
  }
  return "not checkable: nothing in the market data to compare it with";
}

// The answer with each number the verifier read marked. Spans count code points (as Python does); a span whose
// text is not the number's (an abstention replaced the answer) is left unmarked.
export function markedText(text, numbers = []) {
  const chars = Array.from(text);
  const out = [];
  let at = 0;
  for (const n of [...numbers].sort((a, b) => a.start - b.start)) {
    if (n.start < at || chars.slice(n.start, n.end).join("") !== n.text) continue;
    out.push(chars.slice(at, n.start).join(""));
    out.push(el("mark", { class: `num ${n.status}`, title: describe(n), tabindex: "0" }, n.text));
    at = n.end;
  }
  out.push(chars.slice(at).join(""));
  return out;
}

function numbersList(numbers) {
  if (!numbers?.length) return null;
  const counts = {};
  for (const n of numbers) counts[n.status] = (counts[n.status] ?? 0) + 1;
  const summary = Object.entries(STATUS_WORDS).filter(([status]) => counts[status])
    .map(([status, word]) => `${counts[status]} ${word}`).join(", ");
  return el("details", { class: "numbers" },
    el("summary", {}, `Numbers: ${summary}`),
    el("ul", {}, numbers.map((n) => el("li", { class: n.status }, el("mark", { class: `num ${n.status}` }, n.text),
      ` ${describe(n)}`))));
}

function verdictView(finpipe) {
  const verdict = finpipe.verdict ?? "unverified";
  const timing = finpipe.timing?.server_s !== undefined ? `${finpipe.timing.server_s.toFixed(2)} s` : null;
  return el("div", { class: "verdict" },
    el("p", {},
      el("span", { class: `badge ${verdict}` }, verdict), " ", VERDICTS[verdict] ?? "",
      finpipe.relevant === false && verdict !== "refused" ? " (it does not answer what was asked)" : "",
      timing ? el("span", { class: "timing" }, ` · ${timing}`) : null),
    finpipe.problems?.length ? el("ul", { class: "problems" }, finpipe.problems.map((p) => el("li", {}, p))) : null,
    numbersList(finpipe.numbers),
    finpipe.degraded?.length ? el("p", { class: "degraded" }, `Server degraded: ${finpipe.degraded.join("; ")}`) : null);
}

// The facts the model was given: its context lines when the server sends them, else what the grounding says.
export function factsView(grounding) {
  const tickers = grounding?.tickers ?? [];
  const title = [tickers.join(" and ") || "no ticker", grounding?.as_of ? `as of ${grounding.as_of}` : null,
    grounding?.families?.join(", ") || null].filter(Boolean).join(" · ");
  const lines = grounding?.lines ?? [];
  const heading = grounding?.context?.split("\n")[0]?.replace(/:$/, "");
  const body = lines.length
    ? el("dl", {}, lines.map(([label, value]) => [el("dt", {}, label), el("dd", {}, value)]))
    : el("p", { class: "muted" }, grounding?.context ? grounding.context : "No market data was given to the model.");
  return el("details", { class: "facts", open: true },
    el("summary", {}, `Facts: ${title}`),
    heading ? el("p", { class: "heading" }, heading) : null,
    body,
    grounding?.notes?.length ? el("ul", { class: "notes" }, grounding.notes.map((n) => el("li", {}, n))) : null);
}

// One model's answer: streamed text first, then the verdict; or an error said in words.
export function answerView(label) {
  const text = el("p", { class: "text" });
  const root = el("article", { class: "answer", "data-state": "streaming", "data-chunks": "0" },
    el("h3", {}, label), text);
  let chunks = 0;
  return {
    root,
    stream(sofar) {
      chunks += 1;
      root.dataset.chunks = String(chunks);
      text.textContent = sofar;
    },
    finish(sofar, finpipe, model) {
      if (model && !label.includes(model)) root.querySelector("h3").textContent = `${label} (${model})`;
      text.replaceChildren(...markedText(sofar.trim(), finpipe.numbers));
      root.dataset.state = "done";
      root.dataset.verdict = finpipe.verdict;
      root.append(verdictView(finpipe));
    },
    fail(error) {
      root.dataset.state = "error";
      const stopped = error?.name === "AbortError";
      root.append(el("div", { class: "error", role: "alert" },
        el("strong", {}, stopped ? "Stopped" : error?.title ?? "Something went wrong"),
        stopped ? null : ` ${error?.detail ?? error?.message ?? String(error)}`));
    },
  };
}

// A question and its answers (one, or two side by side in compare mode), with the facts shown once.
export function turnView(question) {
  const facts = el("div", { class: "facts-slot" });
  const answers = el("div", { class: "answers" });
  const root = el("section", { class: "turn" }, el("p", { class: "question" }, question), facts, answers);
  return {
    root,
    addAnswer(label) {
      const view = answerView(label);
      answers.append(view.root);
      answers.classList.toggle("compare", answers.children.length > 1);
      return view;
    },
    showFacts(grounding) {
      if (!facts.firstChild) facts.append(factsView(grounding));
    },
  };
}
