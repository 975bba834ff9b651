package verifier

import (
	"encoding/hex"
	"fmt"
	"sort"
)

// Selectors returns the node selectors the evidence supports, sorted:
//
//	tpm:ek_hash:<hex>
//	tpm:manufacturer:<vendor>          only from a verified EK certificate
//	tpm:pcr:sha256:<index>:<hex>       one per quoted PCR
//	tpm:secure_boot:enabled|disabled   only when an event log established it
func (r *Result) Selectors() []string {
	out := []string{"tpm:ek_hash:" + r.EKHash}
	if r.Manufacturer != "" && len(r.EKChain) > 0 {
		out = append(out, "tpm:manufacturer:"+r.Manufacturer)
	}
	for i, d := range r.PCRs {
		out = append(out, fmt.Sprintf("tpm:pcr:sha256:%d:%s", i, hex.EncodeToString(d)))
	}
	if r.SecureBoot != nil {
		if *r.SecureBoot {
			out = append(out, "tpm:secure_boot:enabled")
		} else {
			out = append(out, "tpm:secure_boot:disabled")
		}
	}
	sort.Strings(out)
	return out
}
