"""Serves a policy over the OpenAI chat-completions API.

    python -m jaxrl_async.serve --config=configs/qwen3_tiny.py --workdir=runs/qwen3_tiny \
        --host=127.0.0.1 --port=8000
    python -m jaxrl_async.serve --config=configs/qwen3_0p6b.py --config.model.checkpoint=/path/to/ckpt --port=8000

See `jaxrl_async.serve` and docs/serve.md for the API.
"""

from __future__ import annotations


def main(argv):
    del argv
    from absl import flags, logging

    from jaxrl_async.serve.service import build_service

    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        service = build_service(f.config, workdir=f.workdir, handoff=f.handoff, model_name=f.model_name,
                                max_slots=f.max_slots, max_queue=f.max_queue,
                                warmup=[int(x) for x in f.warmup], producer_id=f.producer_id, max_tokens=f.max_tokens)
    except ValueError as e:  # configuration errors: one line naming the field or path
        raise SystemExit(f"error: {e}") from None
    import uvicorn

    from jaxrl_async.serve.app import make_app

    print(f"serving {service.model_name!r} (version {service.engine.version}) on http://{f.host}:{f.port}/v1")
    if getattr(service.recorder, "producer", None) is not None:
        print(f"agent proxy: groups of {service.recorder.group_size} episodes go into {f.workdir}/queue")
    uvicorn.run(make_app(service), host=f.host, port=f.port, log_level="warning")
    service.engine.close()


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file (task.format='chat').",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "A training run's directory: serve its newest published version and follow "
                                       "newer ones. Empty: the config's weights (model.checkpoint or a random init).")
    flags.DEFINE_string("handoff", "", "With --workdir: the name of the run's shared-memory weight slot, read "
                                       "before the ring buffer (empty: the ring buffer only).")
    flags.DEFINE_integer("producer_id", 0, "With --workdir of a run with runtime.num_samplers = 0: this proxy's "
                                           "number in its group keys (distinct per server on one run).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("model_name", "", "Model id in /v1/models and responses (default: the checkpoint's or "
                                          "workdir's directory name).")
    flags.DEFINE_integer("max_slots", 32, "KV-cache slots: requests decoded together.")
    flags.DEFINE_integer("max_queue", 256, "Requests waiting before the server answers 429.")
    flags.DEFINE_integer("max_tokens", 0, "Generated tokens of a request that sets no max_tokens (0: the rest of "
                                          "the context).")
    flags.DEFINE_list("warmup", ["32"], "Prompt lengths (tokens) to compile the decode loop and prefill for, at "
                                        "every batch size, before serving (prompts are prefilled in power-of-two "
                                        "widths); empty: compile on first use.")
    app.run(main)
