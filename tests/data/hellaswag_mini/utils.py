"""The harness's own HellaSwag document processing, for hellaswag_mini.yaml's `!function`."""
from lm_eval.tasks.hellaswag.utils import preprocess, process_docs  # noqa: F401
