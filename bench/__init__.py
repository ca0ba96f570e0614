"""Benchmarks of the gateway against simulated BBB servers, each beside a baseline.

Every figure is printed beside a baseline measured in the same run on the same
machine, because the machine is shared and noisy: the *ratio* is the result,
the absolute numbers mean little.

Layout (decisions without I/O first, the trio layer last)::

    http.py       HTTP/1.1 request bytes and response-head parsing (no I/O)
    stats.py      percentiles and the per-target summary (no I/O)
    client.py     a lean keep-alive HTTP/1.1 client on trio sockets
    loadgen.py    closed-loop load: N connections, bounded in time and count
    processes.py  the servers under test, each in its own process
    bare.py       the bare quart-trio endpoint (``python -m bench.bare``)
    scenarios.py  join and create: set-up, targets, baselines
    users.py      locust-style User / @task / between, on the raw-socket client
    swarm.py      runs users by weight, bounded in time and count
    lms.py        the LMS mix: Teacher and Student
    mix.py        the mix against gateway, direct backends and bare endpoint; per-call ratios
    ledger_curves.py   in-process ledger curves: cost, memory, snapshots, fsync
    gateway_curves.py  curves through gateway processes: fan-out, pre-filled ledger, RSS
    plot.py       markdown tables and PNGs (matplotlib, the ``bench`` extra)
    curves.py     ``python -m bench curve NAME``
    report.py     the table on stdout and the JSON under bench/results/
    __main__.py   ``python -m bench join|create|lms ...`` and ``curve ...``
"""
