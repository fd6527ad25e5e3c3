"""`edged doctor`: a live check of each link of the data path, in its order.

configuration -> state directory -> microphone -> STT service -> broker ->
clock. Each check ends in a `Check` (pass, warn, fail or skip) with what was
found and, when it did not pass, the fix. Each link is tried with the code
and the options the daemon itself uses (`load_config`, `open_pcm`,
`listen_url` and the session's TLS and headers, the publisher's paho client),
so what passes here works there.
"""
