// finpipe serve's own API as the page uses it: JSON endpoints, and one answer streamed as server-sent events
// (OpenAI's chunks; the verdict rides in the last chunk's `finpipe` field). Errors become sentences.

const TITLES = {
  server_busy: "The server is busy",
  context_length_exceeded: "The question is too long",
  request_too_large: "The question is too long",
  max_tokens_exceeded: "The answer asked for is too long",
  model_not_found: "Unknown model",
  model_unavailable: "The model cannot be loaded",
  host_not_allowed: "This address is not allowed",
  generation_failed: "The generation failed",
};

export class ServerError extends Error {
  constructor(title, detail, status = 0, code = null) {
    super(`${title}: ${detail}`);
    Object.assign(this, { title, detail, status, code });
  }
}

function titleFor(status, code) {
  if (TITLES[code]) return TITLES[code];
  if (status === 503) return "The server is busy";
  if (status >= 500) return "The server failed";
  if (status === 404) return "Not found";
  return "The server refused the request";
}

// An error response as a ServerError: its OpenAI error JSON when it has one, else its status line.
async function errorOf(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON (a proxy's page, say): the status line says what there is
  }
  const detail = error?.message || `${response.status} ${response.statusText || "error"}`;
  return new ServerError(titleFor(response.status, error?.code), detail, response.status, error?.code ?? null);
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ServerError("Cannot reach the server",
      `${location.origin} did not answer (${exc.message}); is finpipe serve still running?`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path) {
  return (await request(path)).json();
}

// /health answers 503 with its JSON when no model can answer: the body is what matters either way.
export async function health() {
  const response = await fetch("/health");
  return response.json();
}

// Ask `model` one question, streamed. onText(piece) gets each piece of the answer as it arrives; resolves to
// { finpipe, finish, model } from the last chunk. Each question stands alone, as with `finpipe ask`.
export async function ask(model, question, { onText, signal } = {}) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content: question }] }),
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const result = { finpipe: null, finish: null, model };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data || data === "[DONE]") continue;
      const body = JSON.parse(data);
      if (body.error) throw new ServerError(titleFor(500, body.error.code), body.error.message, 500, body.error.code);
      result.model = body.model || result.model;
      const choice = body.choices?.[0];
      if (choice?.delta?.content) onText?.(choice.delta.content);
      if (choice?.finish_reason) result.finish = choice.finish_reason;
      if (body.finpipe) result.finpipe = body.finpipe;
    }
  }
  if (!result.finpipe) throw new ServerError("The answer was cut off", "the stream ended before its verdict arrived");
  return result;
}
