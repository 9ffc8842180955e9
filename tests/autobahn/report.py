"""Grades an Autobahn fuzzingclient run (reports/index.json).

upgate-fanout and upgate-frames (upgate's own endpoint, and for frames its
client leg to the backend too): no FAILED, no NON-STRICT, and UNIMPLEMENTED
only in 12.*/13.* (permessage-deflate offers declined on purpose). upgate-splice: every case graded exactly as direct (behavior and
close behavior). Prints a table and a closing line; exits 1 on any breach.
"""
import collections
import json
import sys


def key(case):
    return tuple(int(x) for x in case.split("."))


def main(path):
    with open(path) as f:
        index = json.load(f)
    ok = True
    for agent in sorted(index):
        counts = collections.Counter(r["behavior"] for r in index[agent].values())
        print(f"{agent:15} " + ", ".join(f"{n} {b}" for b, n in sorted(counts.items())))
    fan = index.get("upgate-fanout", {})
    own = 0
    for agent in ("upgate-fanout", "upgate-frames"):
        results = index.get(agent, {})
        own += len(results)
        for case in sorted(results, key=key):
            b = results[case]["behavior"]
            close = results[case]["behaviorClose"]
            allowed = b in ("OK", "INFORMATIONAL") or (
                b == "UNIMPLEMENTED" and case.split(".")[0] in ("12", "13")
            )
            if not allowed or close not in ("OK", "INFORMATIONAL"):
                ok = False
                print(f"{agent} {case}: {b} (close {close})")
    direct, splice = index.get("direct", {}), index.get("upgate-splice", {})
    if set(direct) != set(splice):
        ok = False
        print("splice and direct ran different cases")
    for case in sorted(set(direct) & set(splice), key=key):
        d, s = direct[case], splice[case]
        if (d["behavior"], d["behaviorClose"]) != (s["behavior"], s["behaviorClose"]):
            ok = False
            print(
                f"upgate-splice {case}: {s['behavior']}/{s['behaviorClose']}"
                f" but direct {d['behavior']}/{d['behaviorClose']}"
            )
    n = own + len(splice)
    if ok:
        print(f"autobahn: {n} passed, 0 failed")
    else:
        print("autobahn: FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
