"""Every frame the realtime socket carries, by type: the one list the AsyncAPI document (app/asyncapi.py) is
made from and the user streams accept (app/chat/streams.py refuses a type not here, so an event the code starts
sending without a line here fails its first test instead of reaching clients undocumented; the two hot writers
that number events themselves, a booking and a chat send, write `consultation.updated`, `conversation.opened`
and `message.new`)."""

from __future__ import annotations

# server -> client events, in the recipient's stream (numbered `id`, replayed by `resume`)
STREAM_EVENTS: dict[str, str] = {
    "message.new": "A message in one of the recipient's conversations (their own too), as the REST answer shapes it.",
    "message.updated": "A message edited or deleted by its author.",
    "message.read": "The other party read the conversation up to a message.",
    "conversation.opened": "A conversation's writing window opened (a consultation was confirmed or began).",
    "conversation.closed": "A conversation's writing window closed.",
    "conversation.extended": "A specialist extended a conversation's writing window.",
    "consultation.updated": "A consultation of the recipient changed (booked, confirmed, moved, started, ended...).",
    "document.ready": "A document of the recipient's side passed its checks and can be downloaded.",
    "call.incoming": "A specialist calls: ring until `ring_until`, unless another device answers first.",
    "call.accepted": "The call was answered (on one of the patient's side's devices).",
    "call.declined": "The patient's side declined the call.",
    "call.ended": "The call ended; `end_reason` says how.",
    "call.media": "The other side turned its microphone or camera on or off.",
    "notice": "Something for the recipient to look at, by kind and ids only (no personal or medical text).",
}

# server -> client replies to the client's own frames (not in any stream, never replayed)
REPLIES: dict[str, str] = {
    "pong": "The answer to `ping`, after every event already queued for the socket.",
    "rtc.answer": "The media server's SDP answer to the socket's `rtc.offer`.",
    "error": "A frame the server could not take, with the reason.",
}

# client -> server frames
CLIENT_FRAMES: dict[str, str] = {
    "ping": "Keeps the socket open: a socket silent for longer than WS_HEARTBEAT_SECONDS is closed (4408).",
    "resume": "Every event after `last_event_id`, in order, once; then live ones.",
    "presence": "Whether the app is in the foreground (users with no foreground socket are pushed).",
    "rtc.offer": "The SDP offer of a call's participant (a specialist, or the patient's side after accepting).",
    "rtc.candidate": "A trickled ICE candidate of the participant's connection (null: no more).",
}
