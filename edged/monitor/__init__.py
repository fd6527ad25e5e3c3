"""`edged monitor`: a live view of the input level and the daemon's health.

For someone setting up a microphone: `level` measures the audio (I/O-free),
`server` is the daemon's end of a local Unix socket that streams state,
level and transcripts, `view` is the terminal client, which measures the
microphone itself when no daemon is running.
"""
