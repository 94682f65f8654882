"""``python -m jaxrl_async.tau2 <command>``.

``check --domain=D [--split=base] [--user=scripted|solo] [--tokenizer=DIR] --out=DIR``
    The gold self-check (``gold.check``): every task's gold actions, written as token ids in
    the tokenizer's chat/tool format, through the training path (parse -> tau2 -> tau2's
    evaluator). Prints one line per task that fails, then ``D: N/M tasks scored 1.0``; writes
    ``DIR/D.json`` (tau2 ``Results``); exits 0 when every task whose gold actions pass under
    tau2 directly (``gold.oracle_reward``) passed, 1 otherwise.
"""

from __future__ import annotations

import sys
import time

COMMANDS = ("check",)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("domain", None, "tau2 domain: retail | airline | telecom | mock.")
    flags.DEFINE_string("split", "base", "Task split of the domain (base, train, test; telecom: small, full).")
    flags.DEFINE_string("user", "scripted", "User simulator: scripted | solo (telecom, mock).")
    flags.DEFINE_string("tokenizer", "", "HF tokenizer directory (default: the shipped ChatML tokenizer).")
    flags.DEFINE_string("out", None, "Directory for <domain>.json (tau2 Results).")
    flags.DEFINE_list("task_ids", None, "Only these task ids (default: the whole split).")


def check(FLAGS) -> int:
    from jaxrl_async.tau2 import gold, results
    from jaxrl_async.tau2.env import Tau2Env

    if not FLAGS.domain:
        raise SystemExit("--domain is required (retail | airline | telecom | mock)")
    if not FLAGS.out:
        raise SystemExit("--out is required (the directory for <domain>.json)")
    t0 = time.perf_counter()
    env = Tau2Env(FLAGS.tokenizer or None, domain=FLAGS.domain, split=FLAGS.split, user=FLAGS.user,
                  max_turns=1000, max_context=1 << 30)
    res = gold.check(env, FLAGS.task_ids)
    path = results.save(results.make(env, res.simulations, num_trials=1, agent="gold"), FLAGS.out, FLAGS.domain)
    for task_id, r, o in zip(res.task_ids, res.rewards, res.oracle):
        if r != 1.0:
            verdict = "FAILED" if o == 1.0 else "gold actions cannot pass under tau2 either"
            print(f"task {task_id}: reward {r} ({verdict})")
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    print(res.line())
    return 0 if res.ok else 1


def main(argv):
    from absl import flags

    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m jaxrl_async.tau2 {{{'|'.join(COMMANDS)}}} --domain=D ...; got {argv[1:]}")
    sys.exit({"check": check}[argv[1]](flags.FLAGS))


def run():
    from absl import app

    _define_flags()
    app.run(main)
