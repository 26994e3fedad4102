"""The EM3 + LEMUR ranking model: content tower, memory bank, user interest, ranker."""
