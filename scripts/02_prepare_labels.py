"""Stage 02: masks at every prepared size, cross-validation folds, the test list and a data report, from the labels."""
from pneumoseg.cli import main
from pneumoseg.stages import prepare_labels


def stage(cfg, args):
    summary = prepare_labels.run(cfg, force=args.force)
    print(prepare_labels.format_balance(summary))
    return summary


if __name__ == "__main__":
    main(__doc__.splitlines()[0], stage)
