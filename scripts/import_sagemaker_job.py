"""Continue locally after a SageMaker training job: unpack its model.tar.gz and output.tar.gz as stage 03."""

from pneumoseg.cli import main
from pneumoseg.stages import import_job

if __name__ == "__main__":
    main(__doc__, import_job.stage, import_job.parser)
