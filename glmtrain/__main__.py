from glmtrain import earlysignals

earlysignals.install()  # first: a USR1/TERM during the imports below is recorded, not fatal

from glmtrain.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry()
