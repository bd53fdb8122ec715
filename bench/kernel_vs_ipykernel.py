"""Start-up and trivial-cell round trip: notebookos (3 replicas, the
default, and 1) vs ipykernel, one run.

Usage: python kernel_vs_ipykernel.py [--starts N] [--cells N]
Needs kernelspecs "notebookos", "notebookos-single" (NOTEBOOKOS_REPLICAS=1),
"notebookos-signal" and "python3" (ipykernel) on JUPYTER_PATH.
Start-up = KernelManager.start_kernel() until the first kernel_info_reply
(jupyter_client's wait_for_ready), as a front-end experiences it; first
cell = until the reply of a `pass` sent then (what a user waits for). Round
trip = execute_request("pass") until both its reply and its idle status
have arrived, measured with a lean pyzmq client. Kernels are started
alternately so drift affects both alike. Interrupt latency = interrupt_kernel()
until the KeyboardInterrupt reply of a cell in time.sleep(60).
"""

import argparse
import json
import statistics
import sys
import time

from jupyter_client.manager import KernelManager


def start(name):
    t0 = time.perf_counter()
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    ready = time.perf_counter() - t0
    msg_id = kc.execute("pass")
    while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
        pass
    return ready, time.perf_counter() - t0, km, kc


def round_trips(km, n):
    """A lean client (pyzmq + jupyter_client's Session for signing) so the
    client's own overhead, the same for both kernels, does not dilute the
    comparison."""
    import zmq
    from jupyter_client.session import Session

    info = km.get_connection_info(session=False)
    session = Session(key=km.session.key, signature_scheme=info["signature_scheme"])
    ctx = zmq.Context.instance()
    shell = ctx.socket(zmq.DEALER)
    shell.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    iopub = ctx.socket(zmq.SUB)
    iopub.setsockopt(zmq.SUBSCRIBE, b"")
    iopub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
    poller = zmq.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(iopub, zmq.POLLIN)

    def one(timeout_ms=10000):
        msg = session.msg("execute_request", {"code": "pass", "silent": False, "store_history": True,
                                              "user_expressions": {}, "allow_stdin": False})
        msg_id = msg["header"]["msg_id"]
        session.send(shell, msg)
        got_reply = got_idle = False
        while not (got_reply and got_idle):
            events = dict(poller.poll(timeout_ms))
            if not events:
                raise TimeoutError("no answer to execute_request")
            if shell in events:
                _, m = session.feed_identities(shell.recv_multipart())
                got_reply |= session.deserialize(m)["parent_header"].get("msg_id") == msg_id
            if iopub in events:
                _, m = session.feed_identities(iopub.recv_multipart())
                m = session.deserialize(m)
                got_idle |= (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                             and m["content"]["execution_state"] == "idle")

    time.sleep(0.5)  # let the SUB subscription reach the kernel
    for _ in range(20):
        one()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        one()
        out.append(time.perf_counter() - t)
    shell.close(linger=0)
    iopub.close(linger=0)
    return out


def interrupt_latencies(name, n):
    """Seconds from interrupt_kernel() to the KeyboardInterrupt reply of a
    cell blocked in time.sleep(60)."""
    _, _, km, kc = start(name)
    out = []
    try:
        for _ in range(n):
            msg_id = kc.execute("import time; time.sleep(60)")
            while True:
                m = kc.get_iopub_msg(timeout=30)
                if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "execute_input":
                    break
            time.sleep(0.2)
            t = time.perf_counter()
            km.interrupt_kernel()
            while True:
                r = kc.get_shell_msg(timeout=30)
                if r["parent_header"].get("msg_id") == msg_id:
                    break
            out.append(time.perf_counter() - t)
            assert r["content"].get("ename") == "KeyboardInterrupt", r["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--interrupts", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kernels = {"notebookos": "notebookos", "notebookos-1": "notebookos-single", "ipykernel": "python3"}
    startup = {k: [] for k in kernels}
    first_cell = {k: [] for k in kernels}
    rtt = {k: [] for k in kernels}
    for i in range(args.starts):
        for label, name in kernels.items():
            secs, first, km, kc = start(name)
            startup[label].append(secs)
            first_cell[label].append(first)
            if i == 0:
                rtt[label] = round_trips(km, args.cells)
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    res = {"date": time.strftime("%Y-%m-%d")}
    for label in kernels:
        res[label] = {
            "startup_median_ms": statistics.median(startup[label]) * 1e3,
            "first_cell_median_ms": statistics.median(first_cell[label]) * 1e3,
            "roundtrip_median_ms": statistics.median(rtt[label]) * 1e3,
            "roundtrip_p99_ms": sorted(rtt[label])[int(0.99 * len(rtt[label])) - 1] * 1e3,
        }
    res["ratio"] = {
        "startup": res["notebookos"]["startup_median_ms"] / res["ipykernel"]["startup_median_ms"],
        "first_cell": res["notebookos"]["first_cell_median_ms"] / res["ipykernel"]["first_cell_median_ms"],
        "roundtrip": res["notebookos"]["roundtrip_median_ms"] / res["ipykernel"]["roundtrip_median_ms"],
        "roundtrip_single": res["notebookos-1"]["roundtrip_median_ms"]
        / res["ipykernel"]["roundtrip_median_ms"],
    }
    print(f"{'kernel':<14}{'start-up median':>18}{'first cell median':>20}{'pass round trip median':>26}"
          f"{'p99':>10}")
    for label in kernels:
        r = res[label]
        print(f"{label:<14}{r['startup_median_ms']:>15.1f} ms{r['first_cell_median_ms']:>17.1f} ms"
              f"{r['roundtrip_median_ms']:>23.3f} ms{r['roundtrip_p99_ms']:>7.3f} ms")
    print(f"ratio notebookos (3 replicas)/ipykernel: start-up {res['ratio']['startup']:.2f}, "
          f"first cell {res['ratio']['first_cell']:.2f}, "
          f"round trip {res['ratio']['roundtrip']:.2f} (target: round trip <= 1); "
          f"1 replica: round trip {res['ratio']['roundtrip_single']:.2f}")
    if args.interrupts:
        res["interrupt_median_ms"] = {}
        for label, name in [("notebookos (message)", "notebookos"),
                            ("notebookos (signal)", "notebookos-signal"),
                            ("ipykernel (signal)", "python3")]:
            lat = interrupt_latencies(name, args.interrupts)
            res["interrupt_median_ms"][label] = statistics.median(lat) * 1e3
            print(f"interrupt of time.sleep(60), {label}: median {statistics.median(lat) * 1e3:.1f} ms, "
                  f"max {max(lat) * 1e3:.1f} ms over {len(lat)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
