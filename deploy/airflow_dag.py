"""A daily Airflow (Cloud Composer) DAG that launches the classify Flex Template incrementally.

Copy this file to the Composer environment's dags/ folder and set the Airflow
variables ``beamvision_project``, ``beamvision_region`` and ``beamvision_bucket``
(read when the task runs, through templates, never when the DAG is parsed).
Every night the same parameters run into one catalog (``output``): each run
writes ``run=<UTC start>/`` and classifies only files that are new or changed.
``PARAMETERS`` must name only parameters of deploy/metadata.json (a test checks).
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

BUCKET = "{{ var.value.beamvision_bucket }}"
PARAMETERS = {
    "input": "gs://{bucket}/photos/**",
    "model": "gs://{bucket}/models/mnv2",
    "output": "gs://{bucket}/catalog",
    "incremental": "true",
}

with DAG(
    dag_id="beamvision_nightly",
    schedule="0 3 * * *",
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # runs of one catalog never overlap
) as dag:
    DataflowStartFlexTemplateOperator(
        task_id="classify",
        project_id="{{ var.value.beamvision_project }}",
        location="{{ var.value.beamvision_region }}",
        body={
            "launchParameter": {
                "jobName": "beamvision-nightly-{{ ds_nodash }}",
                "containerSpecGcsPath": f"gs://{BUCKET}/templates/beamvision-classify.json",
                "parameters": {name: value.format(bucket=BUCKET) for name, value in PARAMETERS.items()},
                "environment": {"tempLocation": f"gs://{BUCKET}/tmp"},
            }
        },
        wait_until_finished=True,
    )
