"""Training: data and tokenizer (data.py), pretraining incl. LRT's interleaved passes, distillation."""
