/*
 * link-limit: a Hotpath policy written with the C SDK (policies/sdk-c/hotpath_policy.h).
 *
 * It rejects, with 400 INVALID_SCHEMA, a message whose request.content is a string with more
 * than MAX_LINKS links, and allows everything else: a content that is not a string, or is
 * missing, is the schema policy's business. A link is an occurrence of "http://" or
 * "https://", in any letter case. The SDK has decoded the string, so "https:\/\/" on the
 * wire counts like "https://", and only the request's own "content" member counts, not a
 * "content" key nested in metadata.
 */
#include "hotpath_policy.h"

#define MAX_LINKS 3

static int lower(char c) { return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c; }

/* Whether text[at..len) starts with the lower-case ASCII `prefix`, ignoring letter case. */
static int starts_with(const char *text, hp_size len, hp_size at, const char *prefix) {
    for (hp_size i = 0; prefix[i]; i++)
        if (at + i >= len || lower(text[at + i]) != prefix[i]) return 0;
    return 1;
}

static hp_size count_links(const char *text, hp_size len) {
    hp_size links = 0;
    for (hp_size i = 0; i < len; i++)
        if (starts_with(text, len, i, "http://") || starts_with(text, len, i, "https://")) links++;
    return links;
}

static hp_verdict validate(const hp_input *in) {
    hp_size len = 0;
    const char *content = hp_str(hp_get(hp_request(in), "content"), &len);
    if (!content) return hp_allow();
    hp_size links = count_links(content, len);
    if (links <= MAX_LINKS) return hp_allow();
    hp_json *details = hp_object();
    hp_put_int(details, "maxLinks", MAX_LINKS);
    hp_put_int(details, "links", (hp_i64)links);
    return hp_reject_details(HP_INVALID_SCHEMA, "content has more than 3 links", details);
}

HOTPATH_POLICY(validate)
