"""What operators read: health, Prometheus metrics, the dashboard's figures; liveness rows.

Health is one answer for the URL, the status command and probes. Also here: the liveness row each
supervisor and beat writes about itself.

Reads only, each bounded by an index, except :mod:`.liveness`: a process's own heartbeat row, the one
write that belongs to no run.
"""
