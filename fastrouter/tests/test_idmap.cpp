// Unit tests of IdMap against std::unordered_map under random churn.
#include <random>
#include <unordered_map>

#include "check.h"
#include "idmap.h"

using namespace fr;

TEST(basic_insert_get_erase) {
    IdMap m;
    CHECK_EQ(m.get(1), 0u);
    CHECK(m.insert(0, 5));  // key 0 is a valid master id
    CHECK(!m.insert(0, 6));
    CHECK_EQ(m.get(0), 5u);
    CHECK(m.erase(0));
    CHECK(!m.erase(0));
    CHECK_EQ(m.size(), 0u);
}

TEST(random_churn_matches_unordered_map) {
    std::mt19937_64 rng(12345);
    IdMap m;
    std::unordered_map<uint64_t, uint64_t> ref;
    for (int i = 0; i < 200000; i++) {
        uint64_t key = rng() % 512;  // small key space: long probe runs and many collisions
        uint64_t op = rng() % 3;
        if (op == 0) {
            uint64_t v = (rng() | 1);
            bool fresh = ref.find(key) == ref.end();
            CHECK_EQ(m.insert(key, v), fresh);
            if (fresh) ref[key] = v;
        } else if (op == 1) {
            CHECK_EQ(m.erase(key), ref.erase(key) == 1);
        } else {
            auto it = ref.find(key);
            CHECK_EQ(m.get(key), it == ref.end() ? 0u : it->second);
        }
        if (check::failures()) return;
    }
    CHECK_EQ(m.size(), ref.size());
    size_t seen = 0;
    m.for_each([&](uint64_t k, uint64_t v) {
        seen++;
        CHECK_EQ(ref[k], v);
    });
    CHECK_EQ(seen, ref.size());
}

TEST_MAIN()
