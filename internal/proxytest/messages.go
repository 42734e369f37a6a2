package proxytest

import "google.golang.org/protobuf/reflect/protoreflect"

// WalkMessages calls f on every message within m (in fields, lists and map values), children before their parent:
// for rewriting in place what differs between two answers by construction before they are compared.
func WalkMessages(m protoreflect.Message, f func(protoreflect.Message)) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, v protoreflect.Value) bool {
					WalkMessages(v.Message(), f)
					return true
				})
			}
		case fd.Message() == nil:
		case fd.IsList():
			for i := range v.List().Len() {
				WalkMessages(v.List().Get(i).Message(), f)
			}
		default:
			WalkMessages(v.Message(), f)
		}
		return true
	})
	f(m)
}
