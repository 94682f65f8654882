"""``python -m jaxrl_async.tau2 <command>``.

``check --domain=D [--split=base] [--user=scripted|solo] [--tokenizer=DIR] --out=DIR``
    The gold self-check (``gold.check``): every task's gold actions, written as token ids in
    the tokenizer's chat/tool format, through the training path (parse -> tau2 -> tau2's
    evaluator). Prints one line per task that fails, then ``D: N/M tasks scored 1.0``; writes
    ``DIR/D.json`` (tau2 ``Results``); exits 0 when every task whose gold actions pass under
    tau2 directly (``gold.oracle_reward``) passed, 1 otherwise.

``evaluate --config=CFG --domain=D --trials=K --out=DIR [--split=test] [--workdir=RUN]``
    The policy of ``CFG`` (``model.checkpoint``'s weights, or with ``--workdir`` that run's
    latest parameter version) plays every task of the split ``K`` times through the sampler
    (the config's user, ``eval.temperature``, ``sampler.slots``). Prints avg@K (the mean reward
    over all trials), tau2's pass^k for k = 1..K and a per-task table; writes ``DIR/D.json``
    (tau2 ``Results``, one ``SimulationRun`` per trial). Episodes whose user simulator failed
    are left out and counted.
"""

from __future__ import annotations

import sys
import time

COMMANDS = ("check", "evaluate")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "evaluate: a run config with task.name='tau2'.")
    flags.DEFINE_string("domain", None, "tau2 domain: retail | airline | telecom | mock.")
    flags.DEFINE_string("split", "base", "Task split of the domain (base, train, test; telecom: small, full).")
    flags.DEFINE_string("user", "scripted", "User simulator: scripted | solo (telecom, mock).")
    flags.DEFINE_string("tokenizer", "", "HF tokenizer directory (default: the shipped ChatML tokenizer).")
    flags.DEFINE_string("out", None, "Directory for <domain>.json (tau2 Results).")
    flags.DEFINE_list("task_ids", None, "Only these task ids (default: the whole split).")
    flags.DEFINE_integer("trials", 4, "evaluate: trials per task (the K of avg@K and pass^k).")
    flags.DEFINE_string("workdir", "", "evaluate: a training run whose latest parameter version is evaluated.")
    flags.DEFINE_integer("seed", 0, "evaluate: sampling seed.")


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


def evaluate(FLAGS) -> int:
    from jaxrl_async.tau2 import evaluate as evaluate_lib

    config = FLAGS.config
    if config is None:
        raise SystemExit("--config is required (a run config with task.name='tau2')")
    if FLAGS.trials < 1:
        raise SystemExit(f"--trials must be >= 1; got {FLAGS.trials}")
    if not FLAGS.out:
        raise SystemExit("--out is required (the directory for <domain>.json)")
    report = evaluate_lib.evaluate(config, trials=FLAGS.trials, out=FLAGS.out, domain=FLAGS.domain or None,
                                   split=FLAGS.split if FLAGS["split"].present else None,
                                   workdir=FLAGS.workdir or None, seed=FLAGS.seed, task_ids=FLAGS.task_ids)
    print(report.table())
    return 0


def main(argv):
    from absl import flags

    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m jaxrl_async.tau2 {{{'|'.join(COMMANDS)}}} --domain=D ...; got {argv[1:]}")
    sys.exit({"check": check, "evaluate": evaluate}[argv[1]](flags.FLAGS))


def run():
    from absl import app

    _define_flags()
    app.run(main)
