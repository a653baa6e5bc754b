import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("nnUNet_def_n_proc", "1")
