"""Genome data: FASTA sources -> split regions -> windows -> webdataset shards -> resumable training stream.

``python -m glmtrain.data build data=<name> out=<dir>`` builds shards; see :mod:`glmtrain.data.__main__`.
"""
