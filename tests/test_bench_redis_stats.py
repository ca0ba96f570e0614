"""bench/redis_stats.py: what it reads from ``INFO commandstats`` and ``MONITOR`` lines."""

from __future__ import annotations

from bench.redis_stats import Tally, encode, parse_commandstats, total_without_info


def test_commandstats_calls_by_command() -> None:
    text = (
        "# Commandstats\r\n"
        "cmdstat_xadd:calls=12,usec=340,usec_per_call=28.33,rejected_calls=0,failed_calls=0\r\n"
        "cmdstat_evalsha:calls=5,usec=900,usec_per_call=180.00,rejected_calls=0,failed_calls=1\r\n"
        "cmdstat_info:calls=3,usec=30,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n"
    )
    calls = parse_commandstats(text)
    assert calls == {"xadd": 12, "evalsha": 5, "info": 3}
    later = calls | {"xadd": 20, "info": 9, "hget": 4}
    assert total_without_info(calls, later) == 8 + 4  # the readings' own INFO left out


def test_monitor_lines_split_clients_from_scripts_and_a_multi_block_is_one_request() -> None:
    tally = Tally()
    for line in [
        b'+1733071234.100000 [0 127.0.0.1:5001] "EVALSHA" "abc" "1" "k"',
        b'+1733071234.100001 [0 lua] "XADD" "k" "*" "r" "x"',
        b'+1733071234.100002 [0 lua] "HSET" "m" "n" "1"',
        b'+1733071234.200000 [0 127.0.0.1:5002] "MULTI"',
        b'+1733071234.200001 [0 127.0.0.1:5002] "SET" "a" "1"',
        b'+1733071234.200002 [0 127.0.0.1:5001] "HGET" "m" "gen"',
        b'+1733071234.200003 [0 127.0.0.1:5002] "SET" "b" "2"',
        b'+1733071234.200004 [0 127.0.0.1:5002] "EXEC"',
        b'+1733071234.300000 [0 127.0.0.1:5003] "INFO" "commandstats"',
        b"+OK",
        b"",
    ]:
        tally.line(line)
    assert tally.client_requests == 3  # EVALSHA, the MULTI block, HGET; INFO is the bench's
    assert tally.script_commands == 2
    assert tally.by_command == {"evalsha": 1, "multi": 1, "set": 2, "hget": 1, "exec": 1}


def test_commands_are_resp_arrays() -> None:
    assert encode("INFO", "commandstats") == b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n"
