"""Stage 06: package the fold ensemble, its post-processing and the handler as a SageMaker model.tar.gz.

Output: ${paths.experiment_dir}/06_package/model.tar.gz (see pneumoseg.stages.package); serve it with
python -m pneumoseg.serve --model <that file>.
"""

from pneumoseg.cli import main
from pneumoseg.stages import package

if __name__ == "__main__":
    main(__doc__, package.stage, number="06")
