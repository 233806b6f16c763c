"""Glue for running stage 03 as a SageMaker training job: the job's environment and outputs (:mod:`.job`), its
command line (:mod:`.arguments`), and the code-only source bundle (:mod:`.bundle`)."""
