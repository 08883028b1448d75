// torch.classes.fastclip.BPE: byte-level BPE of many words at once, the merge loop of OpenAI's
// CLIP tokenizer (clip/simple_tokenizer.py) in C++, and its whole pipeline for plain ASCII
// texts. fastclip/tokenizer.py builds the tables from the vocabulary and falls back to numpy
// rounds and Python where this library is not built.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace fastclip {

namespace {

constexpr const char* kOp = "fastclip.BPE";

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

// The tokenizer's merge tables, built once (torch.classes.fastclip.BPE); immutable, so one
// instance serves any number of threads.
class BPE : public torch::CustomClassHolder {
 public:
  BPE(const at::Tensor& merge_keys, const at::Tensor& merge_ranks, const at::Tensor& merged_ids,
      const at::Tensor& byte_ids, const at::Tensor& end_byte_ids, int64_t vocab_size,
      int64_t start_of_text, int64_t end_of_text)
      : start_of_text_(start_of_text), end_of_text_(end_of_text) {
    check_table(merge_keys, "merge_keys", -1);
    check_table(merge_ranks, "merge_ranks", merge_keys.numel());
    check_table(merged_ids, "merged_ids", merge_keys.numel());
    check_table(byte_ids, "byte_ids", 256);
    check_table(end_byte_ids, "end_byte_ids", 256);
    const int64_t count = merge_keys.numel();
    const at::Tensor ranks = merge_ranks.contiguous();
    const int64_t* rank = ranks.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) {
      TORCH_CHECK(rank[i] >= 0 && rank[i] < count, kOp, ": merge_ranks[", i, "] = ", rank[i],
                  " is not a rank of the ", count, " merges.");
    }
    merges_ = std::make_unique<Merges>(merge_keys.contiguous().data_ptr<int64_t>(), rank, count,
                                       vocab_size);
    const at::Tensor merged = merged_ids.contiguous();
    merged_ids_.assign(merged.data_ptr<int64_t>(), merged.data_ptr<int64_t>() + count);
    const at::Tensor bytes = byte_ids.contiguous(), end_bytes = end_byte_ids.contiguous();
    byte_ids_.assign(bytes.data_ptr<int64_t>(), bytes.data_ptr<int64_t>() + 256);
    end_byte_ids_.assign(end_bytes.data_ptr<int64_t>(), end_bytes.data_ptr<int64_t>() + 256);
  }

  // bytes: the UTF-8 bytes of all words one after the other (uint8); lengths: each word's
  // byte count. Returns the ids of all words one after the other, and how many each has.
  std::tuple<at::Tensor, at::Tensor> encode_words(const at::Tensor& bytes,
                                                  const at::Tensor& lengths) const {
    Word word;
    return encode_pieces(bytes, lengths, "word",
                         [&](int64_t w, const uint8_t* piece, int64_t length,
                             std::vector<int64_t>& ids) {
      TORCH_CHECK(length >= 1, kOp, ": word ", w, " has length ", length,
                  "; every word has at least one byte.");
      encode_word(piece, length, word, ids);
    });
  }

  // OpenAI's whole pipeline for texts of printable ASCII, tabs and newlines without "&"
  // (which ftfy and html.unescape leave unchanged): lowercase, OpenAI's regex, BPE.
  // bytes: the texts one after the other; lengths: each text's byte count. Returns the ids of
  // all texts one after the other, and how many each has.
  std::tuple<at::Tensor, at::Tensor> encode_plain_ascii(const at::Tensor& bytes,
                                                        const at::Tensor& lengths) const {
    Word word;
    std::vector<uint8_t> lower;
    return encode_pieces(bytes, lengths, "text",
                         [&](int64_t t, const uint8_t* text, int64_t length,
                             std::vector<int64_t>& ids) {
      lower.resize(length);
      for (int64_t i = 0; i < length; ++i) {
        const uint8_t c = text[i];
        TORCH_CHECK(c == '\t' || c == '\n' || (c >= 0x20 && c <= 0x7e && c != '&'), kOp,
                    ": text ", t, " has byte ", static_cast<int>(c),
                    " at ", i, "; encode_plain_ascii takes printable ASCII, tabs and newlines "
                    "without '&' only.");
        lower[i] = (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
      }
      split_plain_ascii(lower, [&](size_t start, size_t size) {
        encode_word(lower.data() + start, static_cast<int64_t>(size), word, ids);
      }, ids);
    });
  }

 private:
  // Checks that the lengths cut bytes into pieces exactly, each within the buffer (summed in
  // a plain loop: no ATen reduction, whose thread pool would hang in a forked child).
  static at::Tensor checked_bytes(const at::Tensor& bytes, const at::Tensor& lengths,
                                  const char* what) {
    TORCH_CHECK(bytes.device().is_cpu() && bytes.scalar_type() == at::kByte && bytes.dim() == 1,
                kOp, ": bytes must be a 1-D uint8 CPU tensor, got ", bytes.scalar_type(),
                " of shape ", bytes.sizes(), ".");
    check_table(lengths, "lengths", -1);
    const at::Tensor lengths_c = lengths.contiguous();
    const int64_t* length = lengths_c.data_ptr<int64_t>();
    const int64_t size = bytes.numel();
    int64_t total = 0;
    for (int64_t i = 0; i < lengths_c.numel(); ++i) {
      TORCH_CHECK(length[i] >= 0 && length[i] <= size - total, kOp, ": ", what, " ", i,
                  " has length ", length[i], ", which does not fit in the ", size - total,
                  " bytes left of the ", size, " given.");
      total += length[i];
    }
    TORCH_CHECK(total == size, kOp, ": the ", what, " lengths add up to ", total,
                " bytes but ", size, " were given.");
    return bytes.contiguous();
  }

  // Calls encode(index, piece, length, ids) for each piece that lengths cut bytes into,
  // which appends the piece's ids; returns all ids and how many each piece added.
  template <typename EncodePiece>
  std::tuple<at::Tensor, at::Tensor> encode_pieces(const at::Tensor& bytes,
                                                   const at::Tensor& lengths, const char* what,
                                                   EncodePiece encode) const {
    const at::Tensor data = checked_bytes(bytes, lengths, what);
    const uint8_t* all = data.data_ptr<uint8_t>();
    const at::Tensor lengths_c = lengths.contiguous();
    const int64_t* length = lengths_c.data_ptr<int64_t>();
    const int64_t pieces = lengths_c.numel();
    std::vector<int64_t> ids;
    ids.reserve(data.numel());
    at::Tensor counts = at::empty({pieces}, lengths.options());
    int64_t* count = counts.data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t p = 0; p < pieces; ++p) {
      const size_t before = ids.size();
      encode(p, all + offset, length[p], ids);
      count[p] = static_cast<int64_t>(ids.size() - before);
      offset += length[p];
    }
    return {as_tensor(ids, lengths.options()), counts};
  }

  static at::Tensor as_tensor(const std::vector<int64_t>& ids, const at::TensorOptions& options) {
    at::Tensor out = at::empty({static_cast<int64_t>(ids.size())}, options);
    std::copy(ids.begin(), ids.end(), out.data_ptr<int64_t>());
    return out;
  }

  // Appends the ids of one word (its UTF-8 bytes) to ids.
  void encode_word(const uint8_t* bytes, int64_t length, Word& word,
                      std::vector<int64_t>& ids) const {
    word.ids.clear();
    for (int64_t i = 0; i < length; ++i) {
      // The last byte carries "</w>".
      word.ids.push_back(i + 1 < length ? byte_ids_[bytes[i]] : end_byte_ids_[bytes[i]]);
    }
    merge_word(word, *merges_, merged_ids_.data());
    ids.insert(ids.end(), word.ids.begin(), word.ids.end());
  }

  // OpenAI's regex on lowercase ASCII, alternatives in its order:
  //   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
  // calling word(start, size) for each match, and appending special tokens' ids directly.
  template <typename OnWord>
  void split_plain_ascii(const std::vector<uint8_t>& text, OnWord word,
                         std::vector<int64_t>& ids) const {
    static const std::string kStart = "<|startoftext|>", kEnd = "<|endoftext|>";
    const size_t n = text.size();
    auto starts_with = [&](size_t at, const std::string& s) {
      return n - at >= s.size() && std::equal(s.begin(), s.end(), text.begin() + at);
    };
    auto letter = [](uint8_t c) { return c >= 'a' && c <= 'z'; };  // lowercased already
    auto digit = [](uint8_t c) { return c >= '0' && c <= '9'; };
    auto space = [](uint8_t c) { return c == ' ' || c == '\t' || c == '\n'; };
    size_t i = 0;
    while (i < n) {
      const uint8_t c = text[i];
      if (space(c)) {
        i += 1;
      } else if (c == '<' && starts_with(i, kStart)) {
        ids.push_back(start_of_text_);
        i += kStart.size();
      } else if (c == '<' && starts_with(i, kEnd)) {
        ids.push_back(end_of_text_);
        i += kEnd.size();
      } else if (c == '\'' && i + 1 < n &&
                 (text[i + 1] == 's' || text[i + 1] == 't' || text[i + 1] == 'm' ||
                  text[i + 1] == 'd')) {
        word(i, 2);
        i += 2;
      } else if (c == '\'' && (starts_with(i, "'re") || starts_with(i, "'ve") ||
                               starts_with(i, "'ll"))) {
        word(i, 3);
        i += 3;
      } else if (letter(c)) {
        size_t end = i + 1;
        while (end < n && letter(text[end])) {
          ++end;
        }
        word(i, end - i);
        i = end;
      } else if (digit(c)) {
        word(i, 1);
        i += 1;
      } else {
        size_t end = i + 1;
        while (end < n && !space(text[end]) && !letter(text[end]) && !digit(text[end])) {
          ++end;
        }
        word(i, end - i);
        i = end;
      }
    }
  }

  std::unique_ptr<Merges> merges_;
  std::vector<int64_t> merged_ids_, byte_ids_, end_byte_ids_;
  int64_t start_of_text_, end_of_text_;
};

TORCH_LIBRARY_FRAGMENT(fastclip, m) {
  m.class_<BPE>("BPE")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                       int64_t, int64_t>())
      .def("encode_words", &BPE::encode_words)
      .def("encode_plain_ascii", &BPE::encode_plain_ascii);
}

}  // namespace fastclip
