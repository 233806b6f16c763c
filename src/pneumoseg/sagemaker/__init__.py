"""Glue for running stage 03 as a SageMaker training job: the job's environment and outputs (:mod:`.job`), the
code-only source bundle (:mod:`.bundle`), and unpacking a finished job's archives locally (:mod:`.archive`)."""
