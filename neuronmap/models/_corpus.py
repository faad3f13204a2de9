"""A small built-in English corpus to train the byte-level BPE tokenizers of the tiny test models.

Plain prose on everyday topics, so that common English words become single tokens and test prompts
tokenise into a realistic number of pieces. Nothing here is downloaded; the text is part of the package.
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. A good model of language should know that foxes are
animals, that dogs can be lazy, and that jumping is something animals do. The sentence uses every
letter of the English alphabet, which is why typists have practised with it for more than a century.

Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy, and
Madrid is the capital of Spain. Tokyo is the capital of Japan. Canberra, not Sydney, is the capital of
Australia. Ottawa is the capital of Canada. Many people are surprised by these facts at first.

Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees. Ice floats because
it is less dense than liquid water. The sun is a star, and the earth moves around it once every year.
The moon moves around the earth about once a month, and its light is reflected sunlight.

She opened the door, looked outside and decided that the weather was too cold for a walk. Instead she
made a cup of tea, sat by the window and read a book about the history of science. The book explained
how people learned to measure time, distance and temperature, and why careful measurement matters.

In the morning the children walked to school. They talked about their favourite games, the homework they
had forgotten, and the new teacher who played the piano. After school they met in the park, where the
trees were green and the river was quiet. Their parents called them home when the street lights came on.

A neural network is a function with many parameters. During training, the parameters are changed a little
at a time so that the network makes fewer mistakes. A transformer reads a sequence of tokens, builds a
representation for each token, and mixes information between tokens with attention. Every layer adds
something to the residual stream, and the final layer predicts the next word.

The market was busy on Saturday. Farmers sold apples, pears, potatoes, carrots, fresh bread and cheese.
A man played the violin near the fountain while a woman counted coins into a small wooden box. Prices
were higher than last year, but most people said the food was worth it.

Numbers can be written in many ways: one, two, three, four, five, six, seven, eight, nine and ten; or 1,
2, 3, 4, 5, 6, 7, 8, 9 and 10. Twelve months make a year, seven days make a week, and sixty minutes make
an hour. The first day of the week is Monday in some countries and Sunday in others.

The doctor said that the patient should rest, drink water and return in two weeks. The nurse wrote the
instructions on a card. The patient thanked them both, put on his coat and walked slowly to the bus stop,
where he waited for twenty minutes in the rain.

It was not the answer she had expected. The question had seemed simple, but every attempt to solve it
raised new questions. She wrote down what she knew, what she did not know, and what she could test.
By the end of the week she had a plan, a list of experiments and a clear idea of what success would mean.

Good writing is clear, short and honest. It says what happened, why it matters and what the reader
should do next. Bad writing hides the point behind long words. The best way to learn to write well is to
read good writing, to write every day, and to ask a friend to tell you where the text is unclear.

Birds sing in the spring, leaves fall in the autumn, and snow covers the hills in the winter. In the
summer the days are long and the nights are warm. Some animals sleep through the winter, while others
travel thousands of miles to find food and a warmer place to live.

Please remember to save your work, close the window and turn off the light when you leave the office.
Thank you for your help yesterday; the meeting went well and everyone agreed with the new schedule.
We will meet again on Thursday at ten o'clock to discuss the budget, the timeline and the next steps.
"""
