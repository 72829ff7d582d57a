// The clinic's web cabinet: sign-in by phone, a specialist's day of consultations or a patient's chats, the chat
// (history over REST, live over the socket, attachments), and calls through the call page's client
// (`/call/call.js`, loaded first: `window.callClient`). It is the reference client: every request is one of the
// API's public routes, used as the API guide describes.
//
// The tokens live in this tab's sessionStorage (a reload keeps the sign-in, another tab does not share it) and go
// out only as a bearer header. All text from the server is set as textContent, never parsed as HTML.
//
// For automation: `document.body.dataset.view` is signed_out, code_sent, specialist, patient or staff;
// `window.cabinetInfo` holds the open conversation and what the page has done with the tokens.
"use strict";

(() => {
  const STORE = "cabinet.session";
  const SPECIALIST_ROLES = ["doctor", "psychologist", "sonographer", "massage_therapist"];
  const REFRESH_AT = 0.8; // of the access token's life: refreshed well before it runs out
  const REFRESH_RETRY_MS = 5000;
  const HISTORY = 100; // messages shown when a chat opens
  const SEND_TRIES = 3; // a send answered 503 goes again with the same client_id (a retry is a no-op)

  const info = { view: "signed_out", conversationId: null, refreshes: 0, messages: 0 };
  window.cabinetInfo = info;

  let session = null; // {access, refresh, expiresAt, user}
  let refreshTimer = null;
  let refreshing = null; // one refresh at a time: a spent refresh token reused ends the whole login
  let pendingPhone = null;
  let chat = null; // {conversationId, patientId, consultationId, visit}
  let shown = new Map(); // message id -> its <li>
  let dayLoading = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function notice(text) {
    $("notice").textContent = text;
  }

  // ---- the API, with the access token refreshed when it runs out ----

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.detail) || `HTTP ${status}`);
      this.status = status;
      this.reason = body && body.extra ? body.extra.reason : undefined;
    }
  }

  async function request(method, path, body, authorised) {
    const headers = {};
    if (authorised && session) headers.Authorization = `Bearer ${session.access}`;
    let payload;
    if (body instanceof FormData) {
      payload = body; // the browser writes the multipart boundary
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const answer = await fetch(path, { method, headers, body: payload, credentials: "omit", cache: "no-store" });
    const text = await answer.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    return { answer, data };
  }

  async function api(method, path, body) {
    let { answer, data } = await request(method, path, body, true);
    if (answer.status === 401 && session) { // expired meanwhile (a sleeping laptop): refresh once and retry
      await refresh();
      ({ answer, data } = await request(method, path, body, true));
    }
    if (!answer.ok) throw new ApiError(answer.status, data);
    return data;
  }

  function save() {
    if (session) sessionStorage.setItem(STORE, JSON.stringify(session));
    else sessionStorage.removeItem(STORE);
  }

  function adopt(tokens) {
    session = {
      access: tokens.access_token, refresh: tokens.refresh_token,
      expiresAt: Date.now() + tokens.expires_in * 1000,
      user: tokens.user || (session && session.user) || null,
    };
    save();
    scheduleRefresh();
    window.callClient.signIn(session.access); // the open socket stays; the next requests carry the new token
  }

  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    if (!session) return;
    const lifeLeft = session.expiresAt - Date.now();
    refreshTimer = setTimeout(() => refresh().catch(() => {}), Math.max(lifeLeft * REFRESH_AT, 0));
  }

  function refresh() {
    if (!refreshing) refreshing = rotate().finally(() => { refreshing = null; });
    return refreshing;
  }

  async function rotate() {
    const given = session && session.refresh;
    if (!given) throw new ApiError(401, null);
    const retrySoon = () => { // the server is busy or away: the access token may still be good
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(() => refresh().catch(() => {}), REFRESH_RETRY_MS);
    };
    let answer;
    let data;
    try {
      ({ answer, data } = await request("POST", "/api/v1/auth/refresh", { refresh_token: given }, false));
    } catch (error) {
      retrySoon();
      throw error;
    }
    if (!session || session.refresh !== given) return; // signed out (or in again) meanwhile
    if (answer.status === 401 || answer.status === 403) {
      endSession("The sign-in has expired. Sign in again.");
      throw new ApiError(answer.status, data);
    }
    if (!answer.ok) {
      retrySoon();
      throw new ApiError(answer.status, data);
    }
    info.refreshes += 1;
    adopt(data);
  }

  // ---- signing in and out ----

  function setView(view) {
    info.view = view;
    document.body.dataset.view = view;
    const signedIn = !["signed_out", "code_sent"].includes(view);
    $("signin-area").hidden = signedIn;
    $("phone-form").hidden = view !== "signed_out";
    $("code-form").hidden = view !== "code_sent";
    $("workspace").hidden = !signedIn;
    $("signout").hidden = !signedIn;
    $("agenda").hidden = view !== "specialist";
    $("chats").hidden = view !== "patient";
    if (!signedIn) closeChat();
  }

  async function requestCode(event) {
    event.preventDefault();
    const phone = $("phone").value.trim();
    if (!phone) return;
    try {
      const { answer, data } = await request("POST", "/api/v1/auth/otp", { phone }, false);
      if (!answer.ok) throw new ApiError(answer.status, data); // 422 not a phone, 429 too soon
    } catch (error) {
      return notice(`The code was not sent: ${error.message}.`);
    }
    pendingPhone = phone;
    setView("code_sent");
    notice(`A code was sent to ${phone}.`);
    $("code").focus();
  }

  async function enterCode(event) {
    event.preventDefault();
    const code = $("code").value.trim();
    if (!code || !pendingPhone) return;
    const { answer, data } = await request("POST", "/api/v1/auth/token", { phone: pendingPhone, code }, false);
    $("code").value = "";
    if (!answer.ok) {
      notice(`Not signed in: ${(data && data.detail) || `HTTP ${answer.status}`}.`);
      if (answer.status !== 401 && answer.status !== 422) setView("signed_out");
      return;
    }
    pendingPhone = null;
    adopt(data);
    start();
  }

  function start() {
    const user = session.user || {};
    const roles = user.roles || [];
    $("who").textContent = user.full_name || user.phone || "";
    if (roles.some((role) => SPECIALIST_ROLES.includes(role))) {
      setView("specialist");
      notice("Signed in.");
      $("day").value = today(user.timezone);
      loadDay();
    } else if (roles.includes("patient")) {
      setView("patient");
      notice("Signed in.");
      loadChats();
    } else {
      setView("staff");
      notice("This cabinet is for specialists and patients; the back office uses its own tools.");
    }
  }

  function endSession(status) {
    clearTimeout(refreshTimer);
    session = null;
    save();
    window.callClient.signOut("");
    $("who").textContent = "";
    setView("signed_out");
    notice(status);
  }

  async function signOut() {
    const access = session && session.access;
    endSession("Signed out.");
    if (access) { // this login ends on every process, its sockets with it
      fetch("/api/v1/auth/logout", { method: "POST", headers: { Authorization: `Bearer ${access}` },
        credentials: "omit" }).catch(() => {});
    }
  }

  // the day as the user's own zone has it (the calendar reads dates in the caller's zone)
  function today(timeZone) {
    const parts = { year: "numeric", month: "2-digit", day: "2-digit" };
    try {
      return new Intl.DateTimeFormat("en-CA", { ...parts, timeZone: timeZone || undefined }).format(new Date());
    } catch {
      return new Intl.DateTimeFormat("en-CA", parts).format(new Date());
    }
  }

  // REST answers speak the caller's zone, socket events UTC: both shown on the user's own clock
  function clock(iso) {
    const when = new Date(iso);
    if (Number.isNaN(when.getTime())) return "";
    const parts = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    const timeZone = session && session.user ? session.user.timezone : undefined;
    try {
      return new Intl.DateTimeFormat("en-GB", { ...parts, timeZone: timeZone || undefined }).format(when);
    } catch {
      return new Intl.DateTimeFormat("en-GB", parts).format(when);
    }
  }

  // ---- a specialist's day ----

  function loadDay() {
    const day = $("day").value;
    if (!day || !session) return;
    const loading = api("GET", `/api/v1/consultations?from=${day}&to=${day}&limit=200`);
    dayLoading = loading;
    loading.then((page) => {
      if (dayLoading !== loading || info.view !== "specialist") return;
      renderDay(page.items.filter((visit) => visit.status !== "cancelled"));
    }).catch((error) => notice(`The consultations were not loaded: ${error.message}.`));
  }

  function patientName(visit) {
    const patient = visit.patient || {};
    return patient.full_name || patient.initials || "Patient";
  }

  function renderDay(visits) {
    const list = $("visits");
    list.replaceChildren();
    for (const visit of visits) {
      const item = el("li");
      const open = el("button", `${clock(visit.starts_at)} ${patientName(visit)} · ${visit.format} · ${visit.status}`);
      open.type = "button";
      open.dataset.consultationId = visit.id;
      open.setAttribute("aria-current", String(chat !== null && chat.consultationId === visit.id));
      open.addEventListener("click", () => openChat({
        conversationId: visit.conversation_id, patientId: visit.patient_id, consultationId: visit.id, visit,
        title: `${patientName(visit)}, ${clock(visit.starts_at)}`,
      }));
      item.append(open);
      list.append(item);
      if (chat && chat.consultationId === visit.id) { chat.visit = visit; showCallButton(); }
    }
    $("no-visits").hidden = visits.length > 0;
  }

  // ---- a patient's chats ----

  function loadChats() {
    api("GET", "/api/v1/chats?limit=100").then((page) => {
      if (info.view !== "patient") return;
      const list = $("chat-list");
      list.replaceChildren();
      for (const row of page.items) {
        const item = el("li");
        const name = row.counterpart_name || "Specialist";
        const label = `${name}${row.specialty ? ` (${row.specialty})` : ""}${row.unread ? ` · ${row.unread} new` : ""}`;
        const open = el("button", label);
        open.type = "button";
        open.dataset.conversationId = row.conversation_id;
        open.setAttribute("aria-current", String(chat !== null && chat.conversationId === row.conversation_id));
        open.addEventListener("click", () => openChat({
          conversationId: row.conversation_id, patientId: row.patient_id,
          consultationId: row.consultation_id || null, visit: null, title: name,
        }));
        item.append(open);
        list.append(item);
      }
      $("no-chats").hidden = page.items.length > 0;
    }).catch((error) => notice(`The chats were not loaded: ${error.message}.`));
  }

  // ---- the chat ----

  function closeChat() {
    chat = null;
    info.conversationId = null;
    shown = new Map();
    info.messages = 0;
    $("messages").replaceChildren();
    $("conversation").hidden = true;
  }

  async function openChat(opened) {
    if (!opened.conversationId) return notice("This consultation has no chat yet.");
    closeChat();
    chat = opened;
    info.conversationId = opened.conversationId;
    $("conversation").hidden = false;
    $("chat-title").textContent = opened.title;
    $("chat-details").textContent = opened.visit
      ? `${opened.visit.specialty} · ${opened.visit.format} · ${opened.visit.status}` : "";
    for (const button of document.querySelectorAll("#visits button, #chat-list button")) {
      const mine = button.dataset.consultationId ? button.dataset.consultationId === opened.consultationId
        : button.dataset.conversationId === opened.conversationId;
      button.setAttribute("aria-current", String(mine));
    }
    showCallButton();
    try {
      const page = await api("GET", `/api/v1/chats/${opened.conversationId}/messages?limit=${HISTORY}`);
      if (chat !== opened) return;
      for (const message of page.items) showMessage(message); // oldest first
      markRead();
    } catch (error) {
      notice(`The chat history was not loaded: ${error.message}.`);
    }
  }

  function showCallButton() {
    const visit = chat && chat.visit;
    $("start-call").hidden = !(info.view === "specialist" && visit && visit.format === "online"
      && ["confirmed", "in_progress"].includes(visit.status));
  }

  function authorLabel(message) {
    if (message.kind === "system" || !message.author_id) return "Clinic";
    if (session && session.user && message.author_id === session.user.id) return "You";
    return chat && chat.title ? chat.title.split(",")[0] : "";
  }

  function sizeText(bytes) {
    if (bytes >= 1024 * 1024) return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
    if (bytes >= 1024) return `${Math.round(bytes / 1024)} KB`;
    return `${bytes} B`;
  }

  // a message new to the page is appended; one it shows already (a retry, a resumed event, an edit) is redrawn
  function showMessage(message) {
    if (!chat || message.conversation_id !== chat.conversationId) return;
    const item = el("li", null, message.kind === "system" ? "system" : authorLabel(message) === "You" ? "mine" : "");
    item.dataset.id = message.id;
    item.append(el("span", `${authorLabel(message)} ${clock(message.created_at)}`, "meta"));
    item.append(el("span", message.deleted ? "(deleted)" : message.text, "text"));
    if (message.edited_at && !message.deleted) item.append(el("span", " (edited)", "meta"));
    if (!message.deleted && message.documents && message.documents.length) {
      const files = el("ul", null, "attachments");
      for (const attached of message.documents) {
        const file = el("li", `${attached.filename} (${sizeText(attached.size)})`, "attachment");
        file.dataset.documentId = attached.id;
        files.append(file);
      }
      item.append(files);
    }
    const old = shown.get(message.id);
    if (old) {
      old.replaceWith(item);
    } else {
      $("messages").append(item);
      info.messages += 1;
    }
    shown.set(message.id, item);
    item.scrollIntoView({ block: "nearest" });
  }

  function markRead() {
    const last = [...shown.keys()].pop();
    if (!chat || !last || document.hidden) return;
    api("POST", `/api/v1/chats/${chat.conversationId}/read`, { up_to_message_id: last }).catch(() => {});
  }

  function clientId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function send(event) {
    event.preventDefault();
    if (!chat) return;
    const opened = chat;
    const text = $("message-text").value.trim();
    const file = $("attachment").files[0];
    if (!text && !file) return;
    $("send").disabled = true;
    try {
      const documentIds = [];
      if (file) { // uploaded for the conversation's patient, checked by the server, then attached
        const form = new FormData();
        form.append("patient_id", opened.patientId);
        form.append("kind", "other");
        if (opened.consultationId) form.append("consultation_id", opened.consultationId);
        form.append("file", file, file.name); // the form's last part
        notice(`Uploading ${file.name}…`);
        const uploaded = await api("POST", "/api/v1/documents/upload", form);
        documentIds.push(uploaded.id);
      }
      const body = { client_id: clientId(), document_ids: documentIds };
      if (text) body.text = text;
      let sent = null;
      for (let attempt = 1; !sent; attempt += 1) {
        try {
          sent = await api("POST", `/api/v1/chats/${opened.conversationId}/messages`, body);
        } catch (error) {
          if (error.status !== 503 || attempt >= SEND_TRIES) throw error;
          await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
        }
      }
      $("message-text").value = "";
      $("attachment").value = "";
      if (chat === opened) showMessage(sent);
      notice(file ? `${file.name} sent.` : "Sent.");
    } catch (error) {
      notice(error.reason === "conversation_closed" ? "This chat is closed for writing."
        : `Not sent: ${error.message}.`);
    } finally {
      $("send").disabled = false;
    }
  }

  // ---- calls: started here, carried by the call client ----

  async function startCall() {
    const visit = chat && chat.visit;
    if (!visit) return;
    $("start-call").disabled = true;
    try {
      const call = await api("POST", `/api/v1/consultations/${visit.id}/calls`);
      notice(call.delivered_via === "none" ? "The patient has neither the app nor this site open: no one is told."
        : "Calling the patient…");
      await window.callClient.place(call.id);
      notice(""); // the call's own status says the rest
    } catch (error) {
      notice(`The call did not start: ${error.message}.`);
    } finally {
      $("start-call").disabled = false;
    }
  }

  function reread() {
    if (info.view === "specialist") loadDay();
    if (info.view === "patient") loadChats();
    if (chat) loadNewer(chat);
  }

  // the messages after the last one shown (all of them when none is), as a socket without resume missed them
  async function loadNewer(opened) {
    const last = [...shown.keys()].pop();
    const after = last ? `&after=${last}` : "";
    try {
      const page = await api("GET", `/api/v1/chats/${opened.conversationId}/messages?limit=${HISTORY}${after}`);
      if (chat === opened) for (const message of page.items) showMessage(message);
    } catch (error) {
      console.warn("the chat was not reread", error);
    }
  }

  // ---- the socket's events (the call client's socket, resumed after a reconnect) ----

  function onEvent(type, data) {
    if (!session) return;
    switch (type) {
      case "connected": // a socket without resume: what changed before it opened is reread, not replayed
        if (!data.resumed) reread();
        break;
      case "message.new":
      case "message.updated":
        if (chat && data.conversation_id === chat.conversationId) {
          showMessage(data);
          if (type === "message.new") markRead();
        } else if (info.view === "patient") {
          loadChats(); // its unread count
        }
        break;
      case "consultation.updated":
        if (info.view === "specialist") loadDay();
        break;
      case "conversation.opened":
      case "conversation.closed":
      case "conversation.extended":
        if (info.view === "patient") loadChats();
        break;
      default:
        break;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("phone-form").addEventListener("submit", requestCode);
    $("code-form").addEventListener("submit", enterCode);
    $("signout").addEventListener("click", signOut);
    $("day").addEventListener("change", loadDay);
    $("send-form").addEventListener("submit", send);
    $("start-call").addEventListener("click", startCall);
    document.addEventListener("visibilitychange", markRead);
    window.callClient.listen(onEvent);
    let kept = null;
    try { kept = JSON.parse(sessionStorage.getItem(STORE) || "null"); } catch { kept = null; }
    if (kept && kept.refresh) { // a reload of this tab: still signed in
      session = kept;
      if (session.expiresAt - Date.now() < 5000) {
        refresh().then(start).catch(() => {});
      } else {
        scheduleRefresh();
        window.callClient.signIn(session.access);
        start();
      }
    } else {
      setView("signed_out");
    }
  });
})();
