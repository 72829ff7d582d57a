"""Stand-ins for the push providers: the real wire protocols (OAuth + FCM v1 over HTTP, APNs over HTTP/2 with
TLS) served on loopback, recording what reaches them and answering as told."""
