// fastclip::bpe: byte-level BPE of many words at once, the merge loop of OpenAI's CLIP
// tokenizer (clip/simple_tokenizer.py) in C++. fastclip/tokenizer.py builds the tables from
// the vocabulary and falls back to its numpy rounds where this library is not built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fastclip {

namespace {

constexpr const char* kOp = "fastclip::bpe";

void check_table(const at::Tensor& tensor, const char* name, int64_t size) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kLong && tensor.dim() == 1,
              kOp, ": ", name, " must be a 1-D int64 CPU tensor, got ", tensor.scalar_type(),
              " of shape ", tensor.sizes(), " on ", tensor.device(), ".");
  if (size >= 0) {
    TORCH_CHECK(tensor.numel() == size, kOp, ": ", name, " has ", tensor.numel(),
                " entries; expected ", size, ".");
  }
}

// The merges as an open-addressing hash table: key (left * vocab_size + right) -> rank (the
// merge's line in the merges file, which orders merges and indexes merged_ids).
class Merges {
 public:
  Merges(const int64_t* keys, const int64_t* ranks, int64_t count, int64_t vocab_size)
      : vocab_size_(vocab_size) {
    size_t slots = 16;
    while (slots < static_cast<size_t>(2 * count)) {
      slots *= 2;
    }
    mask_ = slots - 1;
    keys_.assign(slots, -1);
    ranks_.assign(slots, -1);
    for (int64_t i = 0; i < count; ++i) {
      size_t slot = hash(keys[i]);
      while (keys_[slot] != -1 && keys_[slot] != keys[i]) {
        slot = (slot + 1) & mask_;
      }
      keys_[slot] = keys[i];
      ranks_[slot] = ranks[i];
    }
  }

  // The rank of the pair (left, right), or -1 when it is not a merge.
  int64_t rank(int64_t left, int64_t right) const {
    const int64_t key = left * vocab_size_ + right;
    for (size_t slot = hash(key);; slot = (slot + 1) & mask_) {
      if (keys_[slot] == key) {
        return ranks_[slot];
      }
      if (keys_[slot] == -1) {
        return -1;
      }
    }
  }

 private:
  size_t hash(int64_t key) const {
    return static_cast<size_t>((static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> 32) &
           mask_;
  }

  int64_t vocab_size_;
  size_t mask_ = 0;
  std::vector<int64_t> keys_;
  std::vector<int64_t> ranks_;
};

// Working space of one word: its symbols and the rank of each symbol's pair with the next.
struct Word {
  std::vector<int64_t> ids, ranks;
  std::vector<int64_t> next_ids, next_ranks;
  std::vector<char> merged;
};

// Merge the lowest-ranked adjacent pair everywhere it occurs, left to right, until no pair
// is a merge: OpenAI's loop, on ids instead of strings. Only the pairs next to a merged
// symbol are looked up again; the others keep their rank.
void merge_word(Word& w, const Merges& merges, const int64_t* merged_ids) {
  std::vector<int64_t>& ids = w.ids;
  std::vector<int64_t>& ranks = w.ranks;
  ranks.resize(ids.size() > 0 ? ids.size() - 1 : 0);
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    ranks[i] = merges.rank(ids[i], ids[i + 1]);
  }
  while (ids.size() > 1) {
    int64_t best = -1;
    size_t best_at = 0;
    for (size_t i = 0; i < ranks.size(); ++i) {
      if (ranks[i] >= 0 && (best < 0 || ranks[i] < best)) {
        best = ranks[i];
        best_at = i;
      }
    }
    if (best < 0) {
      return;
    }
    const int64_t first = ids[best_at], second = ids[best_at + 1];
    const int64_t merged = merged_ids[best];
    w.next_ids.clear();
    w.next_ranks.clear();
    w.merged.clear();
    // The rank of the pair that starts at each kept symbol, where no merge touches it.
    for (size_t i = 0; i < ids.size();) {
      if (i + 1 < ids.size() && ids[i] == first && ids[i + 1] == second) {
        w.next_ids.push_back(merged);
        w.merged.push_back(1);
        w.next_ranks.push_back(-1);
        i += 2;
      } else {
        w.next_ids.push_back(ids[i]);
        w.merged.push_back(0);
        w.next_ranks.push_back(i < ranks.size() ? ranks[i] : -1);
        i += 1;
      }
    }
    w.next_ranks.pop_back();  // the last symbol starts no pair
    for (size_t j = 0; j + 1 < w.next_ids.size(); ++j) {
      if (w.merged[j] || w.merged[j + 1]) {
        w.next_ranks[j] = merges.rank(w.next_ids[j], w.next_ids[j + 1]);
      }
    }
    ids.swap(w.next_ids);
    ranks.swap(w.next_ranks);
  }
}

}  // namespace

// bytes: the UTF-8 bytes of all words one after the other (uint8); lengths: each word's
// byte count. Returns the ids of all words one after the other, and how many each has.
std::tuple<at::Tensor, at::Tensor> bpe(const at::Tensor& bytes, const at::Tensor& lengths,
                                       const at::Tensor& merge_keys,
                                       const at::Tensor& merge_ranks,
                                       const at::Tensor& merged_ids, const at::Tensor& byte_ids,
                                       const at::Tensor& end_byte_ids, int64_t vocab_size) {
  TORCH_CHECK(bytes.device().is_cpu() && bytes.scalar_type() == at::kByte && bytes.dim() == 1,
              kOp, ": bytes must be a 1-D uint8 CPU tensor, got ", bytes.scalar_type(),
              " of shape ", bytes.sizes(), ".");
  check_table(lengths, "lengths", -1);
  check_table(merge_keys, "merge_keys", -1);
  check_table(merge_ranks, "merge_ranks", merge_keys.numel());
  check_table(merged_ids, "merged_ids", merge_keys.numel());
  check_table(byte_ids, "byte_ids", 256);
  check_table(end_byte_ids, "end_byte_ids", 256);
  const at::Tensor bytes_c = bytes.contiguous(), lengths_c = lengths.contiguous();
  const at::Tensor keys_c = merge_keys.contiguous(), ranks_c = merge_ranks.contiguous();
  const at::Tensor merged_c = merged_ids.contiguous(), byte_c = byte_ids.contiguous();
  const at::Tensor end_c = end_byte_ids.contiguous();

  const uint8_t* data = bytes_c.data_ptr<uint8_t>();
  const int64_t* length = lengths_c.data_ptr<int64_t>();
  const int64_t words = lengths_c.numel();
  int64_t total = 0;
  for (int64_t w = 0; w < words; ++w) {
    TORCH_CHECK(length[w] >= 1, kOp, ": word ", w, " has length ", length[w],
                "; every word has at least one byte.");
    total += length[w];
  }
  TORCH_CHECK(total == bytes_c.numel(), kOp, ": the lengths add up to ", total, " bytes but ",
              bytes_c.numel(), " were given.");
  const int64_t merge_count = keys_c.numel();
  const Merges merges(keys_c.data_ptr<int64_t>(), ranks_c.data_ptr<int64_t>(), merge_count,
                      vocab_size);
  const int64_t* ranks = ranks_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < merge_count; ++i) {
    TORCH_CHECK(ranks[i] >= 0 && ranks[i] < merge_count, kOp, ": merge_ranks[", i, "] = ",
                ranks[i], " is not a rank of the ", merge_count, " merges.");
  }
  const int64_t* merged = merged_c.data_ptr<int64_t>();
  const int64_t* byte_id = byte_c.data_ptr<int64_t>();
  const int64_t* end_byte_id = end_c.data_ptr<int64_t>();

  std::vector<int64_t> ids;
  ids.reserve(total);
  at::Tensor counts = at::empty({words}, lengths.options());
  int64_t* count = counts.data_ptr<int64_t>();
  Word word;
  int64_t offset = 0;
  for (int64_t w = 0; w < words; ++w) {
    word.ids.clear();
    for (int64_t i = 0; i < length[w]; ++i) {
      const uint8_t b = data[offset + i];
      word.ids.push_back(i + 1 < length[w] ? byte_id[b] : end_byte_id[b]);  // "</w>" on the last
    }
    offset += length[w];
    merge_word(word, merges, merged);
    ids.insert(ids.end(), word.ids.begin(), word.ids.end());
    count[w] = static_cast<int64_t>(word.ids.size());
  }
  at::Tensor out = at::empty({static_cast<int64_t>(ids.size())}, lengths.options());
  std::copy(ids.begin(), ids.end(), out.data_ptr<int64_t>());
  return {out, counts};
}

TORCH_LIBRARY_FRAGMENT(fastclip, m) {
  m.def(
      "bpe(Tensor bytes, Tensor lengths, Tensor merge_keys, Tensor merge_ranks, "
      "Tensor merged_ids, Tensor byte_ids, Tensor end_byte_ids, int vocab_size) "
      "-> (Tensor, Tensor)",
      &bpe);
}

}  // namespace fastclip
