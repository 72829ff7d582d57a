// The clinic's browser call client: rings on `call.incoming`, joins the call through the SFU with one
// RTCPeerConnection (one audio and one video transceiver, sendrecv: the other side's media comes back on
// them, no renegotiation), mutes, hangs up. The access token lives in memory only.
//
// For automation and for a cabinet embedding the page: `window.callState` is the phase (signed_out,
// connecting, online, ringing, joining, active, ended), `window.callInfo` the details, `window.callClient`
// the actions, `window.inboundVideoFrames()` the video frames decoded from the other side so far. A cabinet
// shares this page's socket (`callClient.listen(fn)` hears every event, and `connected` each time the socket is
// registered) and, for a specialist, joins the call it started with `callClient.place(callId)`.
"use strict";

(() => {
  const PING_MS = 10000; // well inside the server's heartbeat interval (30 s by default)
  const GATHER_MS = 3000; // an unreachable STUN/TURN server must not hold the offer back longer
  const RECONNECT_MAX_MS = 15000;
  const CLOSE_REPLACED = 4409; // a newer socket of this user replaced this one: do not fight it
  const REJOINS = 3; // media reconnects per call after its connection failed (a network change)

  const info = {
    phase: "signed_out", callId: null, endReason: null, error: null, connection: null,
    presence: null, // as the server has it: "foreground" or "background" (a pong after it confirms it)
    connected: false, // the socket is open and the server has it registered
    remoteMedia: { audio: true, video: true }, muted: { audio: false, video: false },
  };
  window.callInfo = info;
  window.callState = info.phase;

  let token = null;
  let socket = null;
  let pingTimer = null;
  let reconnectMs = 1000;
  let reconnectTimer = null;
  let opening = false; // a ticket is being fetched
  let lastEventId = null;
  let presenceSent = null;
  let pings = 0; // sent on this socket; the server answers them in order
  let pongs = 0;
  let presencePing = 0; // the ping sent right after the last presence frame
  let pc = null;
  let localStream = null;
  let rejoins = 0;
  let liveChecked = false; // since this sign-in: the calls already ringing were looked up once
  const listeners = []; // a cabinet's: every socket event, after this page has handled it

  const $ = (id) => document.getElementById(id);

  function setPhase(phase, status) {
    info.phase = phase;
    window.callState = phase;
    document.body.dataset.phase = phase;
    $("incoming").hidden = phase !== "ringing";
    $("call").hidden = !(phase === "joining" || phase === "active");
    if (status !== undefined) $("status").textContent = status;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.detail) || `HTTP ${status}`);
      this.status = status;
      this.reason = body && body.extra ? body.extra.reason : undefined;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const answer = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", cache: "no-store",
    });
    const text = await answer.text();
    const data = text ? JSON.parse(text) : null;
    if (!answer.ok) throw new ApiError(answer.status, data);
    return data;
  }

  // ---- the socket: events in, presence and heartbeat out ----

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
  }

  function ping() {
    pings += 1;
    send({ type: "ping" });
  }

  // while this tab is hidden the server rings the patient's phone too; the pong after says it took it
  function sendPresence() {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    presenceSent = document.hidden ? "background" : "foreground";
    send({ type: "presence", data: { state: presenceSent } });
    ping();
    presencePing = pings;
  }

  async function connect() {
    if (!token || socket || opening) return; // one socket at a time
    if (info.phase === "signed_out") setPhase("connecting", "Connecting…");
    let ticket;
    const used = token;
    opening = true;
    try {
      ({ ticket } = await api("POST", "/api/v1/ws/ticket"));
    } catch (error) {
      // a 401 for a token since replaced (a cabinet's refresh) is no longer news: the new one gets its try
      if (error instanceof ApiError && error.status === 401 && token === used) {
        return signOut("The sign-in has expired. Sign in again.");
      }
      return reconnectLater();
    } finally {
      opening = false;
    }
    if (!token || socket) return;
    const url = new URL("/api/v1/ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("ticket", ticket);
    const ws = new WebSocket(url);
    socket = ws;
    pings = pongs = presencePing = 0;
    info.presence = null;
    let registered = false;
    let resumed = false;
    ws.onopen = () => {
      reconnectMs = 1000;
      // the events missed while away come first, in order, once
      resumed = lastEventId !== null;
      if (resumed) send({ type: "resume", data: { last_event_id: lastEventId } });
      sendPresence(); // its pong also says the server has this socket registered: calls reach it now
      pingTimer = setInterval(ping, PING_MS);
    };
    ws.onmessage = (message) => {
      if (socket !== ws) return;
      let frame;
      try { frame = JSON.parse(message.data); } catch { return; }
      if (frame.type === "pong") {
        pongs += 1;
        if (pongs >= presencePing) info.presence = presenceSent;
        if (!registered) {
          registered = true;
          info.connected = true;
          if (info.phase === "connecting") setPhase("online", "Waiting for the clinic's call.");
          // registered first: a call started from now on rings through the socket, one started before is listed
          if (!liveChecked) {
            liveChecked = true;
            ringForLiveCall();
          }
          // not resumed, a listener rereads what it showed: events before this moment are not replayed to it
          tell("connected", { resumed });
        }
        return;
      }
      if (frame.id !== undefined) lastEventId = frame.id;
      onEvent(frame.type, frame.data || {});
      tell(frame.type, frame.data || {});
    };
    ws.onclose = (event) => {
      clearInterval(pingTimer);
      if (socket !== ws) return;
      socket = null;
      info.connected = false;
      if (!token) return;
      if (event.code === CLOSE_REPLACED) return setPhase(info.phase, "This account opened calls in another window.");
      reconnectLater();
    };
  }

  function tell(type, data) {
    for (const listener of listeners) {
      try { listener(type, data); } catch (error) { console.error(error); }
    }
  }

  function reconnectLater() {
    if (info.phase === "online") setPhase("connecting", "Reconnecting…");
    reconnectTimer = setTimeout(connect, reconnectMs);
    reconnectMs = Math.min(reconnectMs * 2, RECONNECT_MAX_MS);
  }

  function callIdOf(data) {
    return data.call_id || data.id || null;
  }

  function onEvent(type, data) {
    const id = callIdOf(data);
    switch (type) {
      case "call.incoming":
        if (id && !["ringing", "joining", "active"].includes(info.phase)) {
          Object.assign(info, { callId: id, endReason: null, error: null, remoteMedia: { audio: true, video: true } });
          setPhase("ringing", "Incoming call.");
        }
        break;
      case "call.accepted": // answered on another of the patient's devices: stop ringing here
        if (id === info.callId && info.phase === "ringing") setPhase("online", "The call was answered elsewhere.");
        break;
      case "call.declined":
      case "call.ended":
        if (id === info.callId && info.phase !== "online") finish(data.end_reason || data.reason || type.slice(5));
        break;
      case "call.media":
        if (id === info.callId) {
          info.remoteMedia = { audio: data.audio !== false, video: data.video !== false };
          const off = [!info.remoteMedia.audio && "microphone", !info.remoteMedia.video && "camera"].filter(Boolean);
          $("remote-media").textContent = off.length ? `The other side turned off: ${off.join(", ")}.` : "";
        }
        break;
      default:
        break;
    }
  }

  // a page opened while a call already rings (its `call.incoming` went out before this socket existed): the
  // live calls list it; the caller's own outgoing calls (a specialist's) are not for ringing
  async function ringForLiveCall() {
    try {
      const ringing = (await api("GET", "/api/v1/calls?status=live")).items.filter((c) => c.state === "ringing");
      if (!ringing.length) return;
      const me = await api("GET", "/api/v1/me");
      for (const call of ringing) { // newest first
        const visit = await api("GET", `/api/v1/consultations/${call.consultation_id}`);
        if (visit.specialist_id === me.id) continue;
        onEvent("call.incoming", { call_id: call.id });
        return;
      }
    } catch (error) {
      console.warn("the live calls were not read", error);
    }
  }

  // ---- the call: media through the SFU ----

  async function userMedia() {
    try {
      return await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    } catch (error) {
      // no camera (or it is refused): join with the microphone alone rather than not at all
      return navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    }
  }

  async function accept() {
    const id = info.callId;
    if (info.phase !== "ringing") return;
    setPhase("joining", "Joining…");
    try {
      localStream = await userMedia();
    } catch (error) { // not accepted: it still rings, and Decline stays possible
      console.error(error);
      info.error = "no_media";
      return setPhase("ringing", "The microphone is not available: allow it, or decline the call.");
    }
    $("local").srcObject = localStream;
    applyMute();
    try {
      await api("POST", `/api/v1/calls/${id}/accept`);
    } catch (error) { // answered elsewhere, cancelled, or no longer ringing: the socket's event says which
      release();
      info.error = error.reason || error.message;
      return setPhase("online", "The call is no longer ringing.");
    }
    try {
      await join(id);
    } catch (error) {
      fail(error);
    }
  }

  // a specialist's call, ringing at the patient's: its media joins at once (the SFU answers while it rings)
  async function place(id) {
    if (!id || ["ringing", "joining", "active"].includes(info.phase)) return;
    Object.assign(info, { callId: id, endReason: null, error: null, remoteMedia: { audio: true, video: true } });
    setPhase("joining", "Calling…");
    try {
      localStream = await userMedia();
    } catch (error) {
      console.error(error);
      info.error = "no_media";
      finish("failed");
      api("POST", `/api/v1/calls/${id}/end`).catch((ended) => console.warn(ended));
      return;
    }
    if (info.callId !== id || info.phase !== "joining") { // ended while the camera started
      for (const track of localStream.getTracks()) track.stop();
      localStream = null;
      return;
    }
    $("local").srcObject = localStream;
    applyMute();
    try {
      await join(id);
    } catch (error) {
      fail(error);
    }
  }

  async function join(id) {
    let iceServers = [];
    try {
      // TURN credentials come only for a live call of ours: name it
      iceServers = await api("GET", `/api/v1/rtc/ice-servers?call_id=${encodeURIComponent(id)}`);
    } catch (error) {
      console.warn("no ICE servers; host candidates only", error);
    }
    const peer = new RTCPeerConnection({ iceServers, bundlePolicy: "max-bundle", rtcpMuxPolicy: "require" });
    pc = peer;
    const audio = localStream.getAudioTracks()[0];
    const video = localStream.getVideoTracks()[0];
    // always both transceivers: the other side's video arrives even when this side has no camera
    peer.addTransceiver(audio || "audio", { direction: audio ? "sendrecv" : "recvonly", streams: [localStream] });
    peer.addTransceiver(video || "video", { direction: video ? "sendrecv" : "recvonly", streams: [localStream] });
    const remote = new MediaStream();
    $("remote").srcObject = remote;
    peer.ontrack = (event) => {
      remote.addTrack(event.track);
      $("remote").play().catch(() => {}); // autoplay may wait for a gesture; Accept was one
    };
    peer.onconnectionstatechange = () => {
      if (pc !== peer) return;
      info.connection = peer.connectionState;
      if (peer.connectionState === "connected" && info.phase === "joining") setPhase("active", "In the call.");
      if (peer.connectionState === "failed") rejoin(id);
    };
    await peer.setLocalDescription(await peer.createOffer());
    await gathered(peer);
    if (pc !== peer) return;
    const answer = await api("POST", `/api/v1/calls/${id}/rtc/offer`, { sdp: peer.localDescription.sdp, type: "offer" });
    if (pc !== peer) return;
    await peer.setRemoteDescription(answer);
    if (info.muted.audio || info.muted.video) tellMedia(); // muted before joining: the other side hears of it
  }

  // the SFU takes the offer whole (no trickle): it carries every candidate gathered
  function gathered(peer) {
    return new Promise((resolve) => {
      if (peer.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, GATHER_MS);
      peer.addEventListener("icegatheringstatechange", () => {
        if (peer.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  // a network change broke the media: a fresh peer connection offers again (the SFU replaces the old one)
  async function rejoin(id) {
    if (rejoins >= REJOINS || info.callId !== id || !["joining", "active"].includes(info.phase)) {
      if (info.phase === "joining" || info.phase === "active") fail(new Error("the media connection failed"));
      return;
    }
    rejoins += 1;
    setPhase("joining", "Reconnecting the call…");
    if (pc) pc.close();
    pc = null;
    try {
      await join(id);
    } catch (error) {
      fail(error);
    }
  }

  function applyMute() {
    if (!localStream) return;
    for (const track of localStream.getAudioTracks()) track.enabled = !info.muted.audio;
    for (const track of localStream.getVideoTracks()) track.enabled = !info.muted.video;
    $("mute-audio").setAttribute("aria-pressed", String(info.muted.audio));
    $("mute-video").setAttribute("aria-pressed", String(info.muted.video));
    $("mute-audio").textContent = info.muted.audio ? "Unmute microphone" : "Mute microphone";
    $("mute-video").textContent = info.muted.video ? "Turn camera on" : "Turn camera off";
  }

  async function tellMedia() {
    try {
      await api("POST", `/api/v1/calls/${info.callId}/media`, { audio: !info.muted.audio, video: !info.muted.video });
    } catch (error) {
      console.warn("the other side was not told", error);
    }
  }

  async function toggle(kind) {
    info.muted[kind] = !info.muted[kind];
    applyMute();
    if (info.callId && (info.phase === "joining" || info.phase === "active")) await tellMedia();
  }

  async function decline() {
    const id = info.callId;
    if (info.phase !== "ringing") return;
    setPhase("online", "Call declined.");
    try { await api("POST", `/api/v1/calls/${id}/decline`); } catch (error) { console.warn(error); }
  }

  async function hangUp() {
    const id = info.callId;
    if (!id || !(info.phase === "joining" || info.phase === "active")) return;
    finish("completed");
    try { await api("POST", `/api/v1/calls/${id}/end`); } catch (error) { console.warn(error); }
  }

  function release() {
    if (pc) pc.close();
    pc = null;
    if (localStream) for (const track of localStream.getTracks()) track.stop();
    localStream = null;
    $("remote").srcObject = null;
    $("local").srcObject = null;
    $("remote-media").textContent = "";
    rejoins = 0;
  }

  function finish(reason) {
    release();
    info.endReason = reason;
    setPhase("ended", `The call has ended (${reason}).`);
  }

  // accepted but no media: end it, so the doctor is not left waiting for a patient who cannot come
  function fail(error) {
    console.error(error);
    if (!(info.phase === "joining" || info.phase === "active")) return; // it ended meanwhile
    const id = info.callId;
    info.error = error.reason || error.message || String(error);
    finish("failed");
    $("status").textContent = `The call could not continue: ${info.error}.`;
    api("POST", `/api/v1/calls/${id}/end`).catch((ended) => console.warn(ended));
  }

  // ---- signing in and out ----

  // a cabinet hands in a fresh access token before the old one expires: the open socket stays as it is
  function signIn(accessToken) {
    const given = String(accessToken || "").trim();
    if (!given) return;
    const first = token === null;
    token = given;
    if (first) {
      liveChecked = false;
      connect();
    }
  }

  function signOut(status) {
    token = null;
    lastEventId = null; // a place in this user's stream: the next sign-in may be someone else's
    info.connected = false;
    clearTimeout(reconnectTimer);
    release();
    if (socket) socket.close();
    socket = null;
    setPhase("signed_out", status || "Signed out.");
  }

  async function inboundVideoFrames() {
    if (!pc) return 0;
    let frames = 0;
    (await pc.getStats()).forEach((report) => {
      if (report.type === "inbound-rtp" && report.kind === "video") frames += report.framesDecoded || 0;
    });
    return frames;
  }

  window.inboundVideoFrames = inboundVideoFrames;
  window.callClient = { signIn, signOut, accept, decline, hangUp, toggle, place,
    listen: (listener) => { listeners.push(listener); } };

  document.addEventListener("DOMContentLoaded", () => {
    const form = $("signin"); // a cabinet signs in its own way and hands the token in
    if (form) {
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        signIn($("token").value);
        $("token").value = "";
      });
    }
    $("accept").addEventListener("click", accept);
    $("decline").addEventListener("click", decline);
    $("hangup").addEventListener("click", hangUp);
    $("mute-audio").addEventListener("click", () => toggle("audio"));
    $("mute-video").addEventListener("click", () => toggle("video"));
    document.addEventListener("visibilitychange", sendPresence);
    window.addEventListener("online", () => { // the network is back: no need to wait out the backoff
      if (token && !socket) {
        clearTimeout(reconnectTimer);
        reconnectMs = 1000;
        connect();
      }
    });
    // `/call#token=…`: the fragment never reaches a server; drop it from the address bar and history
    const given = new URLSearchParams(location.hash.slice(1)).get("token");
    if (given) {
      history.replaceState(null, "", location.pathname + location.search);
      signIn(given);
    }
  });
})();
