"""τ2-bench retail: the paper's setting for a Qwen3 checkpoint (jaxrl_async/tau2/configs.py, docs/tau2.md).

    python -m jaxrl_async.train --config=configs/tau2_retail_qwen3.py --workdir=runs/tau2_retail \
        --config.model.checkpoint=/path/to/Qwen3 \
        --config.task.kwargs.user_model=openai/USER_MODEL --config.task.kwargs.user_api_base=http://HOST:8000/v1
    python -m jaxrl_async.tau2 evaluate --config=configs/tau2_retail_qwen3.py --domain=retail --split=test \
        --trials=4 --workdir=runs/tau2_retail --out=runs/tau2_retail/eval [same --config.* flags]

Without the checkpoint or the user endpoint the run stops at startup naming the missing field.
"""

from jaxrl_async.tau2.configs import paper_config


def get_config():
    return paper_config("retail")
