"""Calls: call state and signalling (the API's), the SFU that forwards their media, ICE and TURN credentials."""
