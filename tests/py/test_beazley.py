"""Beazley's messaging experiment (bench/beazley.py), short: 500 messages of 8 KB, 1 ms pause.

With one CPU-bound thread beside it, an echo server waits out a switch interval (5 ms) for nearly
every reply; with that thread in ``gilfree.priority.background()`` it should not. The effect is
about 40x on an idle machine, so the margins below hold on a loaded 2-core one.
"""
import importlib.util
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "beazley.py"
MESSAGES = 500


@pytest.fixture(scope="module")
def beazley():
    spec = importlib.util.spec_from_file_location("beazley", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("server", ["threaded", "asyncio", "asyncio-streams"])
def test_background_cpu_thread_no_longer_delays_replies(beazley, server):
    results = [beazley.run_scenario(server, scenario, messages=MESSAGES) for scenario in (1, 2, 3)]
    table = beazley.format_table(results)
    unloaded, loaded, background = results
    assert not any(r.error for r in results), table
    # Scenario 2 shows the seed's problem: a reply waits for the CPU thread's switch interval.
    assert loaded.p50 > 4 * unloaded.p50, table
    # Scenario 3: the waiting server thread has the background holder drop the GIL at once.
    assert background.p50 * 4 < loaded.p50, table
    assert background.total * 2 < loaded.total, table
    # The background thread still gets the GIL while the server waits for the client.
    assert background.cpu_rate > loaded.cpu_rate / 4, table


def test_control_thread_hashes_without_the_gil(beazley):
    # Scenario 4's thread runs C code with the GIL released: replies do not wait for it as they
    # wait for scenario 2's Python thread, and it does run meanwhile.
    results = [beazley.run_scenario("threaded", scenario, messages=MESSAGES) for scenario in (2, 4)]
    table = beazley.format_table(results)
    loaded, control = results
    assert not any(r.error for r in results), table
    assert control.p50 * 4 < loaded.p50, table
    assert control.cpu_calls > 0, table
    assert "4 + C thread, GIL released" in table


def test_asyncio_protocol_echoes_frames_split_and_coalesced(beazley):
    # The protocol server gets bytes as the socket delivers them: a frame cut anywhere, several
    # frames in one read, and a frame longer than its first buffer all come back whole.
    import asyncio
    import struct

    class Transport:
        def __init__(self):
            self.sent = bytearray()

        def write(self, data):
            self.sent += data

    class Window:
        opened = closed = lambda self: None

    async def feed(stream, cuts):
        done = asyncio.get_running_loop().create_future()
        echo = beazley._EchoProtocol(Window(), done)
        echo._transport = transport = Transport()
        position = 0
        for cut in cuts + [len(stream)]:
            while position < cut:
                buf = echo.get_buffer(-1)
                assert len(buf), "get_buffer() returned an empty buffer (asyncio would fail the read)"
                n = min(len(buf), cut - position)
                buf[:n] = stream[position:position + n]
                echo.buffer_updated(n)
                position += n
        echo.connection_lost(None)
        await done
        return bytes(transport.sent)

    frames = [struct.pack("!i", len(p)) + p for p in (b"a" * 10, b"", b"b" * 200_000, b"c" * 3)]
    stream = b"".join(frames)
    assert asyncio.run(feed(stream, [])) == stream
    assert asyncio.run(feed(stream, [1, 2, 7, 16, 50_000, 200_010])) == stream

    async def cut_short():
        done = asyncio.get_running_loop().create_future()
        echo = beazley._EchoProtocol(Window(), done)
        echo._transport = Transport()
        echo.get_buffer(-1)[:3] = b"\0\0\0"
        echo.buffer_updated(3)
        echo.connection_lost(None)
        await done

    with pytest.raises(ConnectionError, match="inside a message"):
        asyncio.run(cut_short())

    # A negative length fails the connection (asyncio closes it with the error), never spins.
    echo = beazley._EchoProtocol(Window(), None)
    echo._transport = Transport()
    echo.get_buffer(-1)[:8] = struct.pack("!i", -4) + b"abcd"
    with pytest.raises(ValueError, match="negative length"):
        echo.buffer_updated(8)


def test_priorities_hold_under_gil_monitor(beazley):
    # gilfree.gil.monitor() hooks the same GIL calls as the priorities: both at once must work.
    results = [beazley.run_scenario("threaded", scenario, messages=MESSAGES, monitor=True) for scenario in (2, 3)]
    table = beazley.format_table(results)
    loaded, background = results
    assert not any(r.error for r in results), table
    assert background.p50 * 4 < loaded.p50, table
    assert "cpu-load" in background.gil and "echo" in background.gil, background.gil


def test_server_failure_is_reported_not_hung(beazley):
    # The server process rejects an unknown variant and exits before publishing a port.
    result = beazley.run_scenario("no-such-server", 1, messages=10)
    assert result.error is not None and "exited with code 2" in result.error
    assert result.total is None


def test_rounds_alternate_the_scenarios_order_and_split_the_messages(beazley, monkeypatch):
    """Scenarios take turns in 1, 2, 3, 3, 2, 1, ... order, so a steady drift of the machine's
    speed falls on each alike; by default an even number of rounds of at most 500 messages, at
    least 6."""
    calls = []

    def record(server, scenario, messages, **options):
        calls.append((scenario, messages))
        return beazley.Result(server, scenario, total=messages * 1e-3, rtts=[1e-4] * messages)

    monkeypatch.setattr(beazley, "run_scenario", record)
    results = beazley.run(["threaded"], [1, 2, 3], messages=2003)
    assert [scenario for scenario, _ in calls] == [1, 2, 3, 3, 2, 1] * 3
    assert {scenario: sum(n for s, n in calls if s == scenario) for scenario in (1, 2, 3)} == {1: 2003, 2: 2003, 3: 2003}
    assert [len(r.rtts) for r in results] == [2003, 2003, 2003]
    assert [beazley.default_rounds(n) for n in (10000, 2000, 2501, 3001, 7)] == [20, 6, 6, 8, 3]
