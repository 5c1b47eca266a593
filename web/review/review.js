// The review page: sign-in with the user pool's managed login (authorization code + PKCE), then claim, look,
// count, submit. Plain JavaScript, no build step. config.json (written beside this file at deploy time) names
// the API, the login domain and the app client.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, token: null, item: null, done: 0 };

function base64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function redirectUri() {
  return window.location.origin + window.location.pathname;
}

async function signIn() {
  const verifier = base64url(crypto.getRandomValues(new Uint8Array(48)));
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const stateValue = base64url(crypto.getRandomValues(new Uint8Array(12)));
  sessionStorage.setItem("pkce", JSON.stringify({ verifier, state: stateValue }));
  const query = new URLSearchParams({
    response_type: "code", client_id: state.config.clientId, redirect_uri: redirectUri(), scope: "openid",
    code_challenge: challenge, code_challenge_method: "S256", state: stateValue,
  });
  window.location.assign(`${state.config.authUrl}/oauth2/authorize?${query}`);
}

async function finishSignIn(code, returnedState) {
  const saved = JSON.parse(sessionStorage.getItem("pkce") || "{}");
  sessionStorage.removeItem("pkce");
  if (!saved.verifier || saved.state !== returnedState) throw new Error("sign-in state does not match; sign in again");
  const response = await fetch(`${state.config.authUrl}/oauth2/token`, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code", code, client_id: state.config.clientId, redirect_uri: redirectUri(),
      code_verifier: saved.verifier,
    }),
  });
  if (!response.ok) throw new Error(`sign-in failed (${response.status})`);
  const tokens = await response.json();
  state.token = tokens.access_token;
  sessionStorage.setItem("token", state.token);
  window.history.replaceState({}, "", redirectUri());
}

async function api(method, path, body) {
  const response = await fetch(`${state.config.apiUrl}${path}`, {
    method,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    sessionStorage.removeItem("token");
    state.token = null;
  }
  if (!response.ok) throw new Error(data.message || `HTTP ${response.status}`);
  return data;
}

async function progress() {
  const stats = await api("GET", "/stats");
  $("progress").textContent = `Pending: ${stats.pending} · done today: ${stats.answeredToday} · done by you this session: ${state.done}`;
}

async function next() {
  $("message").textContent = "";
  const { item } = await api("POST", "/claim");
  state.item = item;
  if (!item) {
    $("work").hidden = true;
    $("empty").hidden = false;
    await progress();
    return;
  }
  const photo = await api("GET", `/items/${item.id}/photo`);
  $("photo").src = photo.url;
  $("caption").textContent = item.photo;
  $("consignment").textContent = item.audit
    ? "Count what you see (audit photo: the expected count is hidden)."
    : `The consignment says: ${item.expectedCount ?? "no expected count"}`;
  $("work").hidden = false;
  $("empty").hidden = true;
  $("count").value = "";
  $("count").focus();
  await progress();
}

async function submit(body) {
  try {
    await api("POST", `/items/${state.item.id}/answer`, { leaseId: state.item.leaseId, ...body });
    state.done += 1;
    await next();
  } catch (error) {
    $("message").textContent = error.message;
  }
}

function wire() {
  $("signin").addEventListener("click", () => signIn().catch((e) => { $("message").textContent = e.message; }));
  $("answer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("count").value.trim();
    if (!/^[0-9]{1,4}$/.test(text) || Number(text) > 1000) {
      $("message").textContent = "Type a whole number from 0 to 1000.";
      return;
    }
    submit({ count: Number(text) });
  });
  $("unusable").addEventListener("click", () => {
    const reason = window.prompt("Why can't you tell? (blurred, dark, items hidden, ...)", "can't tell");
    if (reason && reason.trim()) submit({ unusable: true, reason: reason.trim() });
  });
  $("skip").addEventListener("click", async () => {
    try {
      await api("POST", `/items/${state.item.id}/skip`, { leaseId: state.item.leaseId });
      await next();
    } catch (error) {
      $("message").textContent = error.message;
    }
  });
}

async function main() {
  state.config = await (await fetch("config.json", { cache: "no-store" })).json();
  wire();
  const params = new URLSearchParams(window.location.search);
  if (params.get("code")) await finishSignIn(params.get("code"), params.get("state"));
  state.token = state.token || sessionStorage.getItem("token");
  if (!state.token) return;
  $("signin").hidden = true;
  await next();
}

main().catch((error) => { $("message").textContent = error.message; $("progress").textContent = error.message; });
