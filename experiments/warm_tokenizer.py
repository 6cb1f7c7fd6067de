"""Tokenize a model's corpus once into the on-disk cache, before several processes read it at once.

    python3 -m experiments.warm_tokenizer MODEL_DIR CORPUS_DIR      (CORPUS_DIR/{train,validation}.txt.xz)
"""
import sys

from llm.pipeline import load_data

if __name__ == "__main__":
    model, corpus = sys.argv[1:3]
    load_data(model, f"{corpus}/train.txt.xz", f"{corpus}/validation.txt.xz", 512, 8)
