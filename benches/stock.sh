# Sourced by the bench scripts: one hot product for a load, the same in each.
# stock_flash URL COUNT: creates product `flash` (990 cents, one shard per core) on
# the shop at URL (kami, or examples/redis_shop.rs, which takes the same routes;
# admin token `bench`) and imports COUNT keys `flash-key-0..`, 100,000 a request.
stock_flash() {
    curl -sf -H 'Authorization: Bearer bench' -H 'Content-Type: application/json' \
        -d "{\"id\":\"flash\",\"name\":\"Flash\",\"price_cents\":990,\"shards\":$(nproc)}" "$1/api/v1/products" >/dev/null
    local start
    for ((start = 0; start < $2; start += 100000)); do
        seq $start $((start + 99999 < $2 - 1 ? start + 99999 : $2 - 1)) | sed 's/^/flash-key-/' \
            | curl -sf -H 'Authorization: Bearer bench' -H 'Content-Type: text/plain' --data-binary @- \
                "$1/api/v1/products/flash/keys" >/dev/null
    done
}
