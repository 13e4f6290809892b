"""finpipe's code location for Celery: the same assets, jobs, schedule and sensor as ``finpipe.definitions``, with
every step of a run executed as a Celery task (dagster-celery's ``celery_executor``, configured from
deploy/dagster-celery.yaml, the file the workers start from).

    dagster dev -f deploy/celery_code_location.py        # or a workspace.yaml entry with python_file

Needs ``pip install dagster-celery`` (the version matching dagster); finpipe itself does not depend on it.
"""

from pathlib import Path

import yaml
from dagster_celery import celery_executor

from finpipe.definitions import definitions_with_executor

CELERY_CONFIG = yaml.safe_load((Path(__file__).with_name("dagster-celery.yaml")).read_text())["execution"]["config"]

defs = definitions_with_executor(celery_executor.configured(CELERY_CONFIG, name="finpipe_celery_executor"))
