// Times kvc::decode_batch: scripts/bench_decode.sh builds it and writes the input files
// from tests/support/vllm_wire.py. Each file holds payloads of one shape (each behind its
// size, 4 bytes little-endian), with different values so that timing them in turn is not
// one payload the branch predictor has learnt. Prints the best of several runs in ns per
// payload, with what one payload decodes to.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "decode.hpp"

int main(int argc, char** argv) {
    kvc::Batch batch;
    for (int i = 1; i < argc; i++) {
        std::ifstream file(argv[i], std::ios::binary);
        const std::string data{std::istreambuf_iterator<char>(file), {}};
        std::vector<std::string_view> payloads;
        for (size_t at = 0; at + 4 <= data.size();) {
            uint32_t size;
            std::memcpy(&size, data.data() + at, 4);
            payloads.push_back(std::string_view(data).substr(at + 4, size));
            at += 4 + size;
        }
        for (std::string_view payload : payloads) {
            if (!kvc::decode_batch(payload, batch)) {
                std::fprintf(stderr, "%s: not a batch (%s)\n", argv[i],
                             std::string(kvc::name(batch.error)).c_str());
                return 1;
            }
        }
        constexpr int kRuns = 7, kRounds = 200;
        double best = 1e300;
        for (int run = 0; run < kRuns; run++) {
            const auto start = std::chrono::steady_clock::now();
            for (int round = 0; round < kRounds; round++) {
                for (std::string_view payload : payloads) {
                    kvc::decode_batch(payload, batch);
                    asm volatile("" : : "r"(batch.events.data()) : "memory");  // keep each call
                }
            }
            const std::chrono::duration<double, std::nano> took =
                std::chrono::steady_clock::now() - start;
            best = std::min(best, took.count() / (kRounds * payloads.size()));
        }
        std::printf("%-24s %6zu bytes %3zu events %4zu blocks %5zu tokens %7.0f ns\n", argv[i],
                    payloads.back().size(), batch.events.size(), batch.hashes.size(),
                    batch.tokens.size(), best);
    }
    return 0;
}
