"""The SFU: one peer connection per participant; each participant's encoded media is forwarded to the other
without decoding or re-encoding. In-process in the embedded profile, `python -m app sfu` nodes otherwise."""
